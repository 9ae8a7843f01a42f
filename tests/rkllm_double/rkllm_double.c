/* A stand-in for Rockchip's librkllmrt.so, for tests on machines without an NPU.
 *
 * Compiled once per ABI (-DRKLLM_ABI=110/120/121/130) with the layouts of rkllm_layout.h.
 * rkllm_run echoes its input back, one callback per word: the prompt's words for a text
 * prompt, the token ids in decimal for a token input. A word holding a multi-byte UTF-8
 * character first arrives cut inside that character with RKLLM_RUN_WAITING, then whole
 * with RKLLM_RUN_NORMAL (the vendor's own demos only read NORMAL text). It honours
 * max_new_tokens and rkllm_abort, keeps a word-counting "KV cache" across runs when
 * keep_history is set, and reports perf stats (1.2.1+). In RKLLM_INFER_GET_LAST_HIDDEN_LAYER mode
 * it returns deterministic hidden states derived from the input.
 *
 * RKLLM_INPUT_MULTIMODAL: it logs what it got ("multimodal ..." : the prompt, the image markers of
 * this ABI, image counts and sizes, and the sum of the embedding floats, read as
 * n_image x n_image_tokens x RKLLM_DOUBLE_EMBED_DIM values), then answers
 * "images=<n> image_tokens=<total>" followed by the prompt's words with each "<image>" taken out.
 * Its prefill count is the prompt's words plus the image tokens, as a real runtime counts them.
 *
 * Environment:
 *   RKLLM_DOUBLE_LOG=path        append one line per call (init, run, abort, clear_kv_cache, ...)
 *   RKLLM_DOUBLE_FAIL=init|run|crash
 *                                init: rkllm_init fails; run: RKLLM_RUN_ERROR after the first
 *                                word; crash: abort() after the first word
 *   RKLLM_DOUBLE_FAIL_TRIGGER=s  only fail when the model path (init) or prompt (run, crash)
 *                                contains s
 *   RKLLM_DOUBLE_DELAY_MS=n      sleep n ms before each word
 *   RKLLM_DOUBLE_INIT_GATE=path  rkllm_init waits until this file exists (a load as slow as
 *                                the test wants, ended by the test, not by a clock)
 *   RKLLM_DOUBLE_EMBED_DIM=n     width of one image token's embedding (default 16)
 *   RKLLM_DOUBLE_ABORT_ERROR=1   a run ended by rkllm_abort reports RKLLM_RUN_ERROR instead of
 *                                RKLLM_RUN_FINISH (rkllm.h does not say which one a runtime sends)
 */
#define _POSIX_C_SOURCE 200809L
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "rkllm_layout.h"

/* -DDOUBLE_VERSION='"1.4.0"' pretends to be another release; -DDOUBLE_NO_VERSION leaves no
 * "rkllm-runtime version: ..." string in the library; -DDOUBLE_BARE_VERSIONS adds bare ones. */
#ifndef DOUBLE_VERSION
#if RKLLM_ABI >= 130
#define DOUBLE_VERSION "1.3.0"
#elif RKLLM_ABI >= 121
#define DOUBLE_VERSION "1.2.3"
#elif RKLLM_ABI >= 120
#define DOUBLE_VERSION "1.2.0"
#else
#define DOUBLE_VERSION "1.1.4"
#endif
#endif

#ifdef DOUBLE_BARE_VERSIONS
/* Bare version strings, one of them a bundled library's (as zlib's "1.2.13" might be). */
__attribute__((used)) const char rkllm_double_bare_versions[] = "\0" "1.3.0" "\0" "1.2.13" "\0";
#endif

#ifndef DOUBLE_NO_VERSION
/* The version string the engine finds in the library file, as in the vendor's log line. */
__attribute__((used)) const char rkllm_double_version[] = "rkllm-runtime version: " DOUBLE_VERSION;
#define VERSION_FOR_LOG DOUBLE_VERSION
#else
#define VERSION_FOR_LOG "unknown"
#endif

#define MAX_WORDS 4096
#define MAX_WORD 256

typedef struct {
    RKLLMParam param;
    char model_path[1024];
    LLMResultCallback callback;
    void *userdata;
    volatile int abort_requested;
    volatile int running;
    int cache_len; /* "KV cache": units (words or tokens) kept from earlier runs */
    char img_start[128], img_end[128], img_content[128]; /* RKLLMParam's markers (before 1.3) */
} DoubleModel;

static void log_line(const char *fmt, ...) {
    const char *path = getenv("RKLLM_DOUBLE_LOG");
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

static int should_fail(const char *mode, const char *subject) {
    const char *fail = getenv("RKLLM_DOUBLE_FAIL");
    if (!fail || strcmp(fail, mode) != 0) return 0;
    const char *trigger = getenv("RKLLM_DOUBLE_FAIL_TRIGGER");
    if (!trigger || !*trigger) return 1;
    return subject && strstr(subject, trigger) != NULL;
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000.0 + ts.tv_nsec / 1e6;
}

static void delay(void) {
    const char *ms = getenv("RKLLM_DOUBLE_DELAY_MS");
    if (!ms) return;
    long n = atol(ms);
    if (n <= 0) return;
    struct timespec ts = {n / 1000, (n % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void wait_for_gate(void) {
    const char *gate = getenv("RKLLM_DOUBLE_INIT_GATE");
    if (!gate || !*gate) return;
    log_line("init waiting for %s", gate);
    struct timespec ts = {0, 10 * 1000000L};
    while (access(gate, F_OK) != 0) nanosleep(&ts, NULL);
}

__attribute__((unused)) static const char *safe(const char *s) { return s ? s : ""; }

RKLLMParam rkllm_createDefaultParam(void) {
    RKLLMParam p;
    memset(&p, 0, sizeof p);
    p.max_context_len = 512;
    p.max_new_tokens = -1;
    p.top_k = 40;
    p.top_p = 0.9f;
    p.temperature = 0.8f;
    p.repeat_penalty = 1.1f;
    p.mirostat_tau = 5.0f;
    p.mirostat_eta = 0.1f;
    p.skip_special_token = true;
#if RKLLM_ABI >= 121
    p.extend_param.n_batch = 1;
#endif
    return p;
}

#if RKLLM_ABI >= 130
int rkllm_init(LLMHandle *handle, RKLLMParam *param, RKLLMCallback *callback) {
#else
int rkllm_init(LLMHandle *handle, RKLLMParam *param, LLMResultCallback callback) {
#endif
    /* The runtime's own first line, in the format its users report (rknn-llm issues #129, #235). */
    printf("I rkllm: rkllm-runtime version: %s, rknpu driver version: 0.9.8, platform: RK3588\n", VERSION_FOR_LOG);
    fflush(stdout);
    wait_for_gate();
    if (!handle || !param || !param->model_path || !callback) return -1;
    if (should_fail("init", param->model_path)) {
        log_line("init failed (injected)");
        return -1;
    }
    FILE *model = fopen(param->model_path, "rb");
    if (!model) {
        log_line("init failed: cannot open %s", param->model_path);
        return -1;
    }
    fclose(model);
    if (param->max_context_len <= 0) return -1;
    DoubleModel *m = calloc(1, sizeof *m);
    if (!m) return -1;
    m->param = *param;
    snprintf(m->model_path, sizeof m->model_path, "%s", param->model_path);
    m->param.model_path = m->model_path;
#if RKLLM_ABI >= 130
    if (!callback->result_callback) {
        free(m);
        return -1;
    }
    m->callback = callback->result_callback;
    m->userdata = callback->result_userdata;
#else
    m->callback = callback;
#endif
    log_line("init abi=%d max_context_len=%d max_new_tokens=%d top_k=%d top_p=%.2f temperature=%.2f "
             "repeat_penalty=%.2f skip_special_token=%d base_domain_id=%d",
             RKLLM_ABI, param->max_context_len, param->max_new_tokens, param->top_k, param->top_p,
             param->temperature, param->repeat_penalty, param->skip_special_token,
             param->extend_param.base_domain_id);
#if RKLLM_ABI >= 120
    log_line("init_extend n_keep=%d embed_flash=%d enabled_cpus_num=%d enabled_cpus_mask=0x%x", param->n_keep,
             param->extend_param.embed_flash, param->extend_param.enabled_cpus_num,
             param->extend_param.enabled_cpus_mask);
#endif
#if RKLLM_ABI >= 121
    log_line("init_batch n_batch=%d", param->extend_param.n_batch);
#endif
#if RKLLM_ABI < 130
    log_line("init_image img_start=[%s] img_end=[%s] img_content=[%s]", safe(param->img_start), safe(param->img_end),
             safe(param->img_content));
    /* Copies: the caller's strings need not outlive rkllm_init. */
    snprintf(m->img_start, sizeof m->img_start, "%s", safe(param->img_start));
    snprintf(m->img_end, sizeof m->img_end, "%s", safe(param->img_end));
    snprintf(m->img_content, sizeof m->img_content, "%s", safe(param->img_content));
#endif
    *handle = m;
    return 0;
}

int rkllm_load_lora(LLMHandle handle, RKLLMLoraAdapter *lora_adapter) {
    (void)handle;
    return lora_adapter ? 0 : -1;
}

int rkllm_load_prompt_cache(LLMHandle handle, const char *prompt_cache_path) {
    (void)handle;
    return prompt_cache_path ? 0 : -1;
}

int rkllm_release_prompt_cache(LLMHandle handle) {
    (void)handle;
    return 0;
}

int rkllm_destroy(LLMHandle handle) {
    log_line("destroy");
    free(handle);
    return 0;
}

/* Calls the result callback, whatever its return type in this ABI. */
static void emit(DoubleModel *m, RKLLMResult *result, void *userdata, LLMCallState state) {
    m->callback(result, userdata, state);
}

#define IMAGE_MARKER "<image>"
static char stripped[65536]; /* a multimodal prompt without its image markers */

/* Log what a multimodal input holds and put its answer's first words in `words`; returns the
 * number of words written and sets *image_tokens to the image tokens it holds. */
static int multimodal_words(DoubleModel *m, RKLLMMultiModalInput *mm, char words[][MAX_WORD], int *image_tokens) {
    int markers = 0;
    size_t at = 0;
    for (const char *p = mm->prompt ? mm->prompt : ""; *p && at + 1 < sizeof stripped;) {
        if (strncmp(p, IMAGE_MARKER, strlen(IMAGE_MARKER)) == 0) {
            markers++;
            p += strlen(IMAGE_MARKER);
        } else {
            stripped[at++] = *p++;
        }
    }
    stripped[at] = '\0';
#if RKLLM_ABI >= 130
    const float *embed = mm->image.image_embed;
    size_t per_image = mm->image.n_image_tokens, n_image = mm->image.n_image;
    size_t width = mm->image.image_width, height = mm->image.image_height;
    const char *start = safe(mm->image.image_start), *end = safe(mm->image.image_end);
    const char *content = safe(mm->image.image_content);
    (void)m;
#elif RKLLM_ABI >= 121
    const float *embed = mm->image_embed;
    size_t per_image = mm->n_image_tokens, n_image = mm->n_image;
    size_t width = mm->image_width, height = mm->image_height;
    const char *start = m->img_start, *end = m->img_end, *content = m->img_content;
#else
    /* No image count before 1.2.1: n_image_tokens covers the whole input. */
    const float *embed = mm->image_embed;
    size_t per_image = mm->n_image_tokens, n_image = 1, width = 0, height = 0;
    const char *start = m->img_start, *end = m->img_end, *content = m->img_content;
#endif
    const char *dim_env = getenv("RKLLM_DOUBLE_EMBED_DIM");
    size_t dim = dim_env && atoi(dim_env) > 0 ? (size_t)atoi(dim_env) : 16;
    size_t floats = n_image * per_image * dim;
    double sum = 0;
    for (size_t i = 0; embed && i < floats; i++) sum += embed[i];
    *image_tokens = (int)(n_image * per_image);
    log_line("multimodal prompt=[%s] markers=%d n_image=%zu n_image_tokens=%zu image_width=%zu image_height=%zu "
             "image_start=[%s] image_end=[%s] image_content=[%s] embed_sum=%.4f",
             safe(mm->prompt), markers, n_image, per_image, width, height, start, end, content, sum);
    snprintf(words[0], MAX_WORD, "images=%zu", n_image);
    snprintf(words[1], MAX_WORD, "image_tokens=%d", *image_tokens);
    return 2;
}

/* Split the input into the words the double will echo. */
static int input_words(DoubleModel *m, RKLLMInput *input, char words[][MAX_WORD], const char **text,
                       int *image_tokens) {
    int n = 0;
    *text = NULL;
    *image_tokens = 0;
    if (input->input_type == RKLLM_INPUT_PROMPT || input->input_type == RKLLM_INPUT_MULTIMODAL) {
        const char *p = input->prompt_input;
        if (input->input_type == RKLLM_INPUT_MULTIMODAL) {
            n = multimodal_words(m, &input->multimodal_input, words, image_tokens);
            p = stripped;
        }
        *text = p;
        while (p && *p && n < MAX_WORDS) {
            while (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r') p++;
            if (!*p) break;
            int len = 0;
            while (p[len] && p[len] != ' ' && p[len] != '\n' && p[len] != '\t' && p[len] != '\r') len++;
            int keep = len < MAX_WORD - 1 ? len : MAX_WORD - 1;
            memcpy(words[n], p, keep);
            words[n][keep] = '\0';
            n++;
            p += len;
        }
    } else if (input->input_type == RKLLM_INPUT_TOKEN) {
        for (size_t i = 0; i < input->token_input.n_tokens && n < MAX_WORDS; i++, n++)
            snprintf(words[n], MAX_WORD, "%d", input->token_input.input_ids[i]);
    } else if (input->input_type == RKLLM_INPUT_EMBED) {
        for (size_t i = 0; i < input->embed_input.n_tokens && n < MAX_WORDS; i++, n++) snprintf(words[n], MAX_WORD, "e");
    }
    return n;
}

static int first_multibyte(const char *s) {
    for (int i = 0; s[i]; i++)
        if ((unsigned char)s[i] >= 0xC0) return i;
    return -1;
}

/* RKLLM_INFER_GET_LAST_HIDDEN_LAYER: one result holding HIDDEN_SIZE floats per input unit; unit
 * i's vector is derived from a hash of units 0..i (like a causal model's hidden state). */
#define HIDDEN_SIZE 8
static int hidden_layer_run(DoubleModel *m, char words[][MAX_WORD], int n, void *userdata) {
    static float hidden[MAX_WORDS * HIDDEN_SIZE];
    uint32_t hash = 2166136261u;
    for (int i = 0; i < n; i++) {
        for (const char *c = words[i]; *c; c++) hash = (hash ^ (unsigned char)*c) * 16777619u;
        hash = (hash ^ ' ') * 16777619u;
        for (int d = 0; d < HIDDEN_SIZE; d++) hidden[i * HIDDEN_SIZE + d] = (float)(((hash >> (d * 4)) & 0xF) + 1);
    }
    RKLLMResult result;
    memset(&result, 0, sizeof result);
    result.last_hidden_layer.hidden_states = hidden;
    result.last_hidden_layer.embd_size = HIDDEN_SIZE;
    result.last_hidden_layer.num_tokens = n;
#if RKLLM_ABI >= 120
    emit(m, &result, userdata, RKLLM_RUN_NORMAL);
#else
    emit(m, &result, userdata, RKLLM_RUN_GET_LAST_HIDDEN_LAYER);
#endif
    memset(&result, 0, sizeof result);
    emit(m, &result, userdata, RKLLM_RUN_FINISH);
    m->cache_len = 0;
    log_line("hidden_layer tokens=%d", n);
    return 0;
}

int rkllm_run(LLMHandle handle, RKLLMInput *input, RKLLMInferParam *infer, void *userdata) {
    DoubleModel *m = handle;
    if (!m || !input || !infer) return -1;
#if RKLLM_ABI >= 130
    if (!userdata) userdata = m->userdata;
#endif
    static char words[MAX_WORDS][MAX_WORD];
    const char *text;
    int image_tokens;
    int n = input_words(m, input, words, &text, &image_tokens);
    /* The answer's image words were not in the prompt: the prompt is its other words plus the images. */
    int prompt_units = input->input_type == RKLLM_INPUT_MULTIMODAL ? n - 2 + image_tokens : n;
    int keep_history = 0;
#if RKLLM_ABI >= 120
    keep_history = infer->keep_history;
#endif
    if (!keep_history) m->cache_len = 0;
    int limit = m->param.max_new_tokens;
#if RKLLM_ABI >= 130
    if (infer->max_new_tokens > 0) limit = infer->max_new_tokens;
    if (infer->sampling_params)
        log_line("sampling top_k=%d top_p=%.2f temperature=%.2f repeat_penalty=%.2f", infer->sampling_params->top_k,
                 infer->sampling_params->top_p, infer->sampling_params->temperature,
                 infer->sampling_params->repeat_penalty);
#endif
    const char *role = "";
    int thinking = 0;
#if RKLLM_ABI >= 121
    role = safe(input->role);
    thinking = input->enable_thinking;
#endif
    log_line("run input_type=%d role=%s enable_thinking=%d keep_history=%d cache_before=%d units=%d limit=%d",
             input->input_type, role, thinking, keep_history, m->cache_len, prompt_units, limit);
    if (infer->mode == RKLLM_INFER_GET_LAST_HIDDEN_LAYER) return hidden_layer_run(m, words, n, userdata);
    m->running = 1;
    double started = now_ms();
    double first_token = started;
    int generated = 0;
    RKLLMResult result;
    char piece[MAX_WORD + 2];
    int status = 0;
    for (int i = 0; i < n; i++) {
        if (m->abort_requested) break;
        if (limit > 0 && generated >= limit) break;
        if (i == 0) first_token = now_ms(); /* the prompt is "prefilled" */
        delay();
        snprintf(piece, sizeof piece, "%s%s", i ? " " : "", words[i]);
        memset(&result, 0, sizeof result);
        result.token_id = i;
        int cut = first_multibyte(piece);
        if (cut >= 0) {
            /* The token ends inside a character: the runtime says WAITING with the partial bytes. */
            char partial[MAX_WORD + 2];
            memcpy(partial, piece, cut + 1);
            partial[cut + 1] = '\0';
            result.text = partial;
            emit(m, &result, userdata, RKLLM_RUN_WAITING);
            generated++;
            if (limit > 0 && generated >= limit) break;
        }
        result.text = piece;
        emit(m, &result, userdata, RKLLM_RUN_NORMAL);
        generated++;
        if (i == 0 && should_fail("crash", text)) {
            log_line("crash (injected)");
            abort();
        }
        if (i == 0 && should_fail("run", text)) {
            log_line("run error (injected)");
            memset(&result, 0, sizeof result);
            emit(m, &result, userdata, RKLLM_RUN_ERROR);
            status = -1;
            break;
        }
    }
    int aborted = m->abort_requested;
    const char *abort_error = getenv("RKLLM_DOUBLE_ABORT_ERROR");
    if (aborted && status == 0 && abort_error && strcmp(abort_error, "1") == 0) {
        log_line("run error after abort");
        memset(&result, 0, sizeof result);
        emit(m, &result, userdata, RKLLM_RUN_ERROR);
        status = 1; /* reported, and no FINISH follows */
    }
    m->cache_len += prompt_units + generated;
    if (status == 0) {
        memset(&result, 0, sizeof result);
        result.token_id = -1;
#if RKLLM_ABI >= 121
        double ended = now_ms();
        result.perf.prefill_tokens = prompt_units;
        result.perf.prefill_time_ms = (float)(first_token - started);
        result.perf.generate_tokens = generated;
        result.perf.generate_time_ms = (float)(ended - first_token);
        result.perf.memory_usage_mb = 1.5f;
#else
        (void)first_token;
#endif
        emit(m, &result, userdata, RKLLM_RUN_FINISH);
    }
    log_line("run_end generated=%d aborted=%d status=%d", generated, aborted, status);
    m->abort_requested = 0;
    m->running = 0;
    return status;
}

int rkllm_run_async(LLMHandle handle, RKLLMInput *input, RKLLMInferParam *infer, void *userdata) {
    /* The double has no worker thread: async runs complete before returning. */
    return rkllm_run(handle, input, infer, userdata);
}

int rkllm_abort(LLMHandle handle) {
    DoubleModel *m = handle;
    if (!m) return -1;
    log_line("abort");
    if (m->running) m->abort_requested = 1;
    return 0;
}

int rkllm_is_running(LLMHandle handle) {
    DoubleModel *m = handle;
#if RKLLM_ABI >= 130
    return m && m->running ? 1 : 0;
#else
    return m && m->running ? 0 : 1; /* before 1.3: 0 means running */
#endif
}

#if RKLLM_ABI >= 121
int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int *start_pos, int *end_pos) {
    (void)start_pos;
    (void)end_pos;
#elif RKLLM_ABI >= 120
int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt) {
#endif
#if RKLLM_ABI >= 120
    DoubleModel *m = handle;
    if (!m) return -1;
    log_line("clear_kv_cache keep_system_prompt=%d", keep_system_prompt);
    m->cache_len = 0;
    return 0;
}

int rkllm_set_chat_template(LLMHandle handle, const char *system_prompt, const char *prompt_prefix,
                            const char *prompt_postfix) {
    if (!handle) return -1;
    log_line("chat_template system=[%s] prefix=[%s] postfix=[%s]", safe(system_prompt), safe(prompt_prefix),
             safe(prompt_postfix));
    return 0;
}
#endif

#if RKLLM_ABI >= 121
int rkllm_get_kv_cache_size(LLMHandle handle, int *cache_sizes) {
    DoubleModel *m = handle;
    if (!m || !cache_sizes) return -1;
    cache_sizes[0] = m->cache_len;
    return 0;
}

int rkllm_set_function_tools(LLMHandle handle, const char *system_prompt, const char *tools,
                             const char *tool_response_str) {
    if (!handle) return -1;
    log_line("function_tools system=[%s] tools=[%s] tool_response=[%s]", safe(system_prompt), safe(tools),
             safe(tool_response_str));
    return 0;
}

int rkllm_set_cross_attn_params(LLMHandle handle, RKLLMCrossAttnParam *cross_attn_params) {
    return handle && cross_attn_params ? 0 : -1;
}
#endif
