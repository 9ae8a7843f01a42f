/* A stand-in for Rockchip's librknnrt.so: the calls an image encoder makes (rknn_init, rknn_query,
 * rknn_inputs_set, rknn_run, rknn_outputs_get/release, rknn_destroy), for tests without an NPU.
 *
 * Its "model" is a text file the test writes, one line:
 *   RKNN-DOUBLE h=<H> w=<W> c=<C> fmt=nhwc|nchw tokens=<T> embed=<D> outputs=<N>
 * The input tensor is [1,H,W,C] (nhwc) or [1,C,H,W] (nchw); each output is [1,T,D].
 * rknn_run splits the input it was given (H*W*C values, uint8 or float32, NHWC or NCHW as the
 * caller says) into T equal runs of values and gives token t of output o the values
 *   mean(run t) + 0.001 * d + 0.1 * o      (d = 0..D-1; a uint8 value counts as v / 255)
 * so a test can tell which pixels reached it. Every call is logged to RKNN_DOUBLE_LOG.
 *
 * Environment:
 *   RKNN_DOUBLE_LOG=path     append one line per call
 *   RKNN_DOUBLE_FAIL=init|run  make rknn_init or rknn_run fail
 */
#define _POSIX_C_SOURCE 200809L
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rknn_layout.h"

typedef struct {
    unsigned h, w, c, tokens, embed, outputs;
    int nchw;
    float *input; /* H*W*C values as the model sees them (NHWC order), set by rknn_inputs_set */
    int has_input;
    float *result; /* outputs x tokens x embed, made by rknn_run */
    int has_result;
} DoubleModel;

static void log_line(const char *fmt, ...) {
    const char *path = getenv("RKNN_DOUBLE_LOG");
    if (!path || !*path) return;
    FILE *f = fopen(path, "a");
    if (!f) return;
    va_list args;
    va_start(args, fmt);
    vfprintf(f, fmt, args);
    va_end(args);
    fputc('\n', f);
    fclose(f);
}

static int failing(const char *what) {
    const char *fail = getenv("RKNN_DOUBLE_FAIL");
    return fail && strcmp(fail, what) == 0;
}

static unsigned field(const char *line, const char *key) {
    const char *at = strstr(line, key);
    return at ? (unsigned)strtoul(at + strlen(key), NULL, 10) : 0;
}

int rknn_init(rknn_context *context, void *model, uint32_t size, uint32_t flag, void *extend) {
    (void)flag;
    (void)extend;
    if (!context || !model || size != 0) return RKNN_ERR_PARAM_INVALID; /* RKLLama passes a path */
    if (failing("init")) {
        log_line("init failed (injected)");
        return RKNN_ERR_FAIL;
    }
    FILE *f = fopen((const char *)model, "r");
    if (!f) {
        log_line("init failed: cannot open %s", (const char *)model);
        return RKNN_ERR_MODEL_INVALID;
    }
    char line[512] = {0};
    char *got = fgets(line, sizeof line, f);
    fclose(f);
    if (!got || strncmp(line, "RKNN-DOUBLE ", 12) != 0) {
        log_line("init failed: not a double model");
        return RKNN_ERR_MODEL_INVALID;
    }
    DoubleModel *m = calloc(1, sizeof *m);
    if (!m) return RKNN_ERR_FAIL;
    m->h = field(line, "h=");
    m->w = field(line, "w=");
    m->c = field(line, "c=");
    m->tokens = field(line, "tokens=");
    m->embed = field(line, "embed=");
    m->outputs = field(line, "outputs=");
    if (!m->outputs) m->outputs = 1;
    m->nchw = strstr(line, "fmt=nchw") != NULL;
    size_t values = (size_t)m->h * m->w * m->c;
    if (!values || !m->tokens || !m->embed || values % m->tokens) {
        free(m);
        log_line("init failed: bad sizes");
        return RKNN_ERR_MODEL_INVALID;
    }
    m->input = calloc(values, sizeof(float));
    m->result = calloc((size_t)m->outputs * m->tokens * m->embed, sizeof(float));
    if (!m->input || !m->result) return RKNN_ERR_FAIL;
    *context = (rknn_context)(uintptr_t)m;
    log_line("init h=%u w=%u c=%u fmt=%s tokens=%u embed=%u outputs=%u", m->h, m->w, m->c,
             m->nchw ? "nchw" : "nhwc", m->tokens, m->embed, m->outputs);
    return RKNN_SUCC;
}

static DoubleModel *model_of(rknn_context context) { return (DoubleModel *)(uintptr_t)context; }

int rknn_destroy(rknn_context context) {
    DoubleModel *m = model_of(context);
    if (!m) return RKNN_ERR_CTX_INVALID;
    log_line("destroy");
    free(m->input);
    free(m->result);
    free(m);
    return RKNN_SUCC;
}

static void fill_attr(rknn_tensor_attr *attr, unsigned n_dims, const unsigned *dims, int fmt, int type,
                      unsigned elem_size, const char *name) {
    uint32_t index = attr->index;
    memset(attr, 0, sizeof *attr);
    attr->index = index;
    attr->n_dims = n_dims;
    attr->n_elems = 1;
    for (unsigned i = 0; i < n_dims; i++) {
        attr->dims[i] = dims[i];
        attr->n_elems *= dims[i];
    }
    attr->size = attr->n_elems * elem_size;
    attr->size_with_stride = attr->size;
    attr->fmt = fmt;
    attr->type = type;
    attr->qnt_type = RKNN_TENSOR_QNT_NONE;
    attr->scale = 1.0f;
    snprintf(attr->name, sizeof attr->name, "%s", name);
}

int rknn_query(rknn_context context, rknn_query_cmd cmd, void *info, uint32_t size) {
    DoubleModel *m = model_of(context);
    if (!m || !info) return RKNN_ERR_CTX_INVALID;
    if (cmd == RKNN_QUERY_IN_OUT_NUM && size == sizeof(rknn_input_output_num)) {
        rknn_input_output_num *num = info;
        num->n_input = 1;
        num->n_output = m->outputs;
    } else if (cmd == RKNN_QUERY_INPUT_ATTR && size == sizeof(rknn_tensor_attr)) {
        rknn_tensor_attr *attr = info;
        if (attr->index != 0) return RKNN_ERR_PARAM_INVALID;
        unsigned nhwc[4] = {1, m->h, m->w, m->c}, nchw[4] = {1, m->c, m->h, m->w};
        /* A model converted without quantization takes float16 inside; callers send uint8 or float32. */
        fill_attr(attr, 4, m->nchw ? nchw : nhwc, m->nchw ? RKNN_TENSOR_NCHW : RKNN_TENSOR_NHWC,
                  RKNN_TENSOR_FLOAT16, 2, "pixel");
    } else if (cmd == RKNN_QUERY_OUTPUT_ATTR && size == sizeof(rknn_tensor_attr)) {
        rknn_tensor_attr *attr = info;
        if (attr->index >= m->outputs) return RKNN_ERR_PARAM_INVALID;
        unsigned dims[3] = {1, m->tokens, m->embed};
        fill_attr(attr, 3, dims, RKNN_TENSOR_NCHW, RKNN_TENSOR_FLOAT16, 2, "image_embeds");
    } else if (cmd == RKNN_QUERY_SDK_VERSION && size == sizeof(rknn_sdk_version)) {
        rknn_sdk_version *version = info;
        snprintf(version->api_version, sizeof version->api_version, "2.3.2 (rknn double)");
        snprintf(version->drv_version, sizeof version->drv_version, "0.9.8");
    } else {
        log_line("query cmd=%d size=%u refused", cmd, size);
        return RKNN_ERR_PARAM_INVALID;
    }
    log_line("query cmd=%d", cmd);
    return RKNN_SUCC;
}

int rknn_inputs_set(rknn_context context, uint32_t n_inputs, rknn_input inputs[]) {
    DoubleModel *m = model_of(context);
    if (!m || n_inputs != 1 || !inputs || !inputs[0].buf || inputs[0].index != 0) return RKNN_ERR_PARAM_INVALID;
    size_t values = (size_t)m->h * m->w * m->c;
    rknn_input *in = &inputs[0];
    size_t elem = in->type == RKNN_TENSOR_UINT8 ? 1 : in->type == RKNN_TENSOR_FLOAT32 ? 4 : 0;
    if (!elem || in->size != values * elem || in->pass_through || (in->fmt != RKNN_TENSOR_NHWC && in->fmt != RKNN_TENSOR_NCHW)) {
        log_line("inputs_set refused size=%u type=%d fmt=%d", in->size, in->type, in->fmt);
        return RKNN_ERR_INPUT_INVALID;
    }
    size_t plane = (size_t)m->h * m->w;
    for (size_t i = 0; i < values; i++) {
        /* Value i of the model's NHWC order, read from the caller's layout. */
        size_t pixel = i / m->c, channel = i % m->c;
        size_t from = in->fmt == RKNN_TENSOR_NHWC ? i : channel * plane + pixel;
        m->input[i] = elem == 1 ? ((const uint8_t *)in->buf)[from] / 255.0f : ((const float *)in->buf)[from];
    }
    m->has_input = 1;
    log_line("inputs_set size=%u type=%s fmt=%s first=%.4f,%.4f,%.4f", in->size, elem == 1 ? "uint8" : "float32",
             in->fmt == RKNN_TENSOR_NHWC ? "nhwc" : "nchw", m->input[0], m->input[1 % values], m->input[2 % values]);
    return RKNN_SUCC;
}

int rknn_run(rknn_context context, void *extend) {
    (void)extend;
    DoubleModel *m = model_of(context);
    if (!m || !m->has_input) return RKNN_ERR_CTX_INVALID;
    if (failing("run")) {
        log_line("run failed (injected)");
        return RKNN_ERR_FAIL;
    }
    size_t run = (size_t)m->h * m->w * m->c / m->tokens;
    for (unsigned t = 0; t < m->tokens; t++) {
        double sum = 0;
        for (size_t i = 0; i < run; i++) sum += m->input[t * run + i];
        float mean = (float)(sum / run);
        for (unsigned o = 0; o < m->outputs; o++)
            for (unsigned d = 0; d < m->embed; d++)
                m->result[((size_t)o * m->tokens + t) * m->embed + d] = mean + 0.001f * d + 0.1f * o;
    }
    m->has_result = 1;
    log_line("run");
    return RKNN_SUCC;
}

int rknn_outputs_get(rknn_context context, uint32_t n_outputs, rknn_output outputs[], void *extend) {
    (void)extend;
    DoubleModel *m = model_of(context);
    if (!m || !m->has_result || !outputs || n_outputs != m->outputs) return RKNN_ERR_PARAM_INVALID;
    size_t floats = (size_t)m->tokens * m->embed;
    for (uint32_t o = 0; o < n_outputs; o++) {
        if (!outputs[o].want_float || outputs[o].is_prealloc || outputs[o].index != o) return RKNN_ERR_PARAM_INVALID;
        float *buf = malloc(floats * sizeof(float));
        if (!buf) return RKNN_ERR_FAIL;
        memcpy(buf, m->result + o * floats, floats * sizeof(float));
        outputs[o].buf = buf;
        outputs[o].size = (uint32_t)(floats * sizeof(float));
    }
    log_line("outputs_get n=%u", n_outputs);
    return RKNN_SUCC;
}

int rknn_outputs_release(rknn_context context, uint32_t n_outputs, rknn_output outputs[]) {
    if (!model_of(context) || !outputs) return RKNN_ERR_PARAM_INVALID;
    for (uint32_t o = 0; o < n_outputs; o++) {
        free(outputs[o].buf);
        outputs[o].buf = NULL;
    }
    log_line("outputs_release n=%u", n_outputs);
    return RKNN_SUCC;
}
