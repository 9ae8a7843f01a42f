/* The librkllmrt C interface, one layout per runtime ABI, for the test double and the
 * layout program. Written from the published rkllm.h of airockchip/rknn-llm; select the
 * ABI with -DRKLLM_ABI=110 (1.1.x), 120 (1.2.0), 121 (1.2.1-1.2.3) or 130 (1.3.0).
 * abi_layout.c printed identical sizes and offsets when compiled against this file and
 * against the vendor's own rkllm.h of release-v1.1.4, v1.2.0, v1.2.1, v1.2.3 and v1.3.0. */
#ifndef RKLLM_LAYOUT_H
#define RKLLM_LAYOUT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifndef RKLLM_ABI
#error "define RKLLM_ABI (110, 120, 121 or 130)"
#endif

typedef void *LLMHandle;

typedef enum {
    RKLLM_RUN_NORMAL = 0,
    RKLLM_RUN_WAITING = 1,
    RKLLM_RUN_FINISH = 2,
    RKLLM_RUN_ERROR = 3,
#if RKLLM_ABI < 120
    RKLLM_RUN_GET_LAST_HIDDEN_LAYER = 4,
#endif
} LLMCallState;

typedef enum {
    RKLLM_INPUT_PROMPT = 0,
    RKLLM_INPUT_TOKEN = 1,
    RKLLM_INPUT_EMBED = 2,
    RKLLM_INPUT_MULTIMODAL = 3,
} RKLLMInputType;

typedef enum {
    RKLLM_INFER_GENERATE = 0,
    RKLLM_INFER_GET_LAST_HIDDEN_LAYER = 1,
#if RKLLM_ABI >= 120
    RKLLM_INFER_GET_LOGITS = 2,
#endif
} RKLLMInferMode;

#if RKLLM_ABI >= 130
typedef int (*LLMGetEmbedCallback)(void *userdata, int32_t *tokens, uint64_t num_tokens, void *embed, uint64_t len);
typedef int (*LLMTokenizerCallback)(void *userdata, const char *text, int32_t text_len, int32_t *tokens,
                                    int32_t n_tokens_max);
#endif

typedef struct {
    int32_t base_domain_id;
#if RKLLM_ABI >= 120
    int8_t embed_flash;
    int8_t enabled_cpus_num;
    uint32_t enabled_cpus_mask;
#endif
#if RKLLM_ABI >= 121
    uint8_t n_batch;
    int8_t use_cross_attn;
    uint8_t reserved[104];
#elif RKLLM_ABI >= 120
    uint8_t reserved[106];
#else
    uint8_t reserved[112];
#endif
} RKLLMExtendParam;

typedef struct {
    const char *model_path;
    int32_t max_context_len;
    int32_t max_new_tokens;
    int32_t top_k;
#if RKLLM_ABI >= 120
    int32_t n_keep;
#endif
    float top_p;
    float temperature;
    float repeat_penalty;
    float frequency_penalty;
    float presence_penalty;
    int32_t mirostat;
    float mirostat_tau;
    float mirostat_eta;
    bool skip_special_token;
#if RKLLM_ABI >= 130
    bool ignore_eos_token;
#endif
    bool is_async;
#if RKLLM_ABI < 130
    const char *img_start;
    const char *img_end;
    const char *img_content;
#endif
    RKLLMExtendParam extend_param;
} RKLLMParam;

typedef struct {
    const char *lora_adapter_path;
    const char *lora_adapter_name;
    float scale;
} RKLLMLoraAdapter;

typedef struct {
    float *embed;
    size_t n_tokens;
} RKLLMEmbedInput;

typedef struct {
    int32_t *input_ids;
    size_t n_tokens;
} RKLLMTokenInput;

typedef struct {
    char *prompt;
#if RKLLM_ABI >= 130
    struct {
        float *image_embed;
        size_t n_image_tokens;
        size_t n_image;
        const char *image_start;
        const char *image_end;
        const char *image_content;
        size_t image_width;
        size_t image_height;
    } image;
    struct {
        float *video_embed;
        size_t n_frame_tokens;
        size_t n_frame_per_video;
        size_t n_video;
        const char *video_start;
        const char *video_end;
        const char *video_content;
        size_t frame_width;
        size_t frame_height;
    } video;
#else
    float *image_embed;
    size_t n_image_tokens;
#if RKLLM_ABI >= 121
    size_t n_image;
    size_t image_width;
    size_t image_height;
#endif
#endif
} RKLLMMultiModalInput;

typedef struct {
#if RKLLM_ABI >= 121
    const char *role;
    bool enable_thinking;
#endif
    RKLLMInputType input_type;
    union {
        const char *prompt_input;
        RKLLMEmbedInput embed_input;
        RKLLMTokenInput token_input;
        RKLLMMultiModalInput multimodal_input;
    };
} RKLLMInput;

typedef struct {
    const char *lora_adapter_name;
} RKLLMLoraParam;

typedef struct {
    int save_prompt_cache;
    const char *prompt_cache_path;
} RKLLMPromptCacheParam;

#if RKLLM_ABI >= 121
typedef struct {
    float *encoder_k_cache;
    float *encoder_v_cache;
    float *encoder_mask;
    int32_t *encoder_pos;
    int num_tokens;
} RKLLMCrossAttnParam;
#endif

#if RKLLM_ABI >= 130
typedef struct {
    int32_t top_k;
    float top_p;
    float temperature;
    float repeat_penalty;
    float frequency_penalty;
    float presence_penalty;
    int32_t mirostat;
    float mirostat_tau;
    float mirostat_eta;
} RKLLMSamplingParam;
#endif

typedef struct {
    RKLLMInferMode mode;
    RKLLMLoraParam *lora_params;
    RKLLMPromptCacheParam *prompt_cache_params;
#if RKLLM_ABI >= 130
    RKLLMSamplingParam *sampling_params;
#endif
#if RKLLM_ABI >= 120
    int keep_history;
#endif
#if RKLLM_ABI >= 130
    int32_t max_new_tokens;
#endif
} RKLLMInferParam;

typedef struct {
    const float *hidden_states;
    int embd_size;
    int num_tokens;
} RKLLMResultLastHiddenLayer;

#if RKLLM_ABI >= 120
typedef struct {
    const float *logits;
    int vocab_size;
    int num_tokens;
} RKLLMResultLogits;
#endif

#if RKLLM_ABI >= 121
typedef struct {
    float prefill_time_ms;
    int prefill_tokens;
    float generate_time_ms;
    int generate_tokens;
    float memory_usage_mb;
} RKLLMPerfStat;
#endif

typedef struct {
    const char *text;
    int32_t token_id;
    RKLLMResultLastHiddenLayer last_hidden_layer;
#if RKLLM_ABI >= 120
    RKLLMResultLogits logits;
#endif
#if RKLLM_ABI >= 121
    RKLLMPerfStat perf;
#endif
} RKLLMResult;

#if RKLLM_ABI >= 121
typedef int (*LLMResultCallback)(RKLLMResult *result, void *userdata, LLMCallState state);
#else
typedef void (*LLMResultCallback)(RKLLMResult *result, void *userdata, LLMCallState state);
#endif

#if RKLLM_ABI >= 130
typedef struct {
    LLMResultCallback result_callback;
    void *result_userdata;
    LLMTokenizerCallback tokenizer_callback;
    void *tokenizer_userdata;
    LLMGetEmbedCallback embed_callback;
    void *embed_userdata;
} RKLLMCallback;
#endif

RKLLMParam rkllm_createDefaultParam(void);
#if RKLLM_ABI >= 130
int rkllm_init(LLMHandle *handle, RKLLMParam *param, RKLLMCallback *callback);
#else
int rkllm_init(LLMHandle *handle, RKLLMParam *param, LLMResultCallback callback);
#endif
int rkllm_load_lora(LLMHandle handle, RKLLMLoraAdapter *lora_adapter);
int rkllm_load_prompt_cache(LLMHandle handle, const char *prompt_cache_path);
int rkllm_release_prompt_cache(LLMHandle handle);
int rkllm_destroy(LLMHandle handle);
int rkllm_run(LLMHandle handle, RKLLMInput *rkllm_input, RKLLMInferParam *rkllm_infer_params, void *userdata);
int rkllm_run_async(LLMHandle handle, RKLLMInput *rkllm_input, RKLLMInferParam *rkllm_infer_params, void *userdata);
int rkllm_abort(LLMHandle handle);
int rkllm_is_running(LLMHandle handle);
#if RKLLM_ABI >= 121
int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int *start_pos, int *end_pos);
int rkllm_get_kv_cache_size(LLMHandle handle, int *cache_sizes);
int rkllm_set_function_tools(LLMHandle handle, const char *system_prompt, const char *tools,
                             const char *tool_response_str);
int rkllm_set_cross_attn_params(LLMHandle handle, RKLLMCrossAttnParam *cross_attn_params);
#elif RKLLM_ABI >= 120
int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt);
#endif
#if RKLLM_ABI >= 120
int rkllm_set_chat_template(LLMHandle handle, const char *system_prompt, const char *prompt_prefix,
                            const char *prompt_postfix);
#endif

#endif
