/* DDL's CPU kernels (float32), built on first use by cpu_kernels.py and called through ctypes.
 *
 * A state of `tokens` tokens is channel-major: channel j of token t is a row of `hidden` floats at
 * state + (t * channels + j) * hidden. A scalar state is the case channels == 1. Outputs may not alias inputs.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

static float dot(const float *a, const float *b, int64_t n)
{
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i)
        sum += a[i] * b[i];
    return sum;
}

static float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

/* One token's rewrite: with scale = 1 / sqrt(||h||^2 + eps^2),
 *   c_j = beta * (v_j - scale * h . X_j) * scale    (erase; the write-only control: beta * v_j * scale)
 *   Y_j = X_j + c_j h */
static void rewrite_token(const float *x, const float *h, const float *target, float beta, float *y, int64_t hidden,
                          int64_t channels, float eps, int erase)
{
    const float scale = 1.0f / sqrtf(dot(h, h, hidden) + eps * eps);
    for (int64_t j = 0; j < channels; ++j, x += hidden, y += hidden) {
        const float error = erase ? target[j] - dot(h, x, hidden) * scale : target[j];
        const float coef = error * beta * scale;
#pragma omp simd
        for (int64_t i = 0; i < hidden; ++i)
            y[i] = x[i] + coef * h[i];
    }
}

/* The rewrite of every token, given its target (tokens, channels) and gate (tokens,). */
void ddl_rewrite(const float *state, const float *direction, const float *target, const float *beta, float *out,
                 int64_t tokens, int64_t hidden, int64_t channels, float eps, int erase, int threads)
{
#pragma omp parallel for num_threads(threads) if (threads > 1 && tokens >= 32) schedule(static)
    for (int64_t t = 0; t < tokens; ++t)
        rewrite_token(state + t * channels * hidden, direction + t * hidden, target + t * channels, beta[t],
                      out + t * channels * hidden, hidden, channels, eps, erase);
}

/* The rewrite of every token for training: also writes what backward and the state tape need, per token
 * `scale` (tokens,), and per token and channel `read` (scale * h . X_j, erase only), `error` (v_j - read_j) and
 * `coef` (c_j). */
void ddl_rewrite_forward(const float *state, const float *direction, const float *target, const float *beta,
                         float *out, float *scale_out, float *read_out, float *error_out, float *coef_out,
                         int64_t tokens, int64_t hidden, int64_t channels, float eps, int erase, int threads)
{
#pragma omp parallel for num_threads(threads) if (threads > 1 && tokens >= 32) schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
        const float *h = direction + t * hidden, *x = state + t * channels * hidden;
        float *y = out + t * channels * hidden;
        const float scale = 1.0f / sqrtf(dot(h, h, hidden) + eps * eps);
        scale_out[t] = scale;
        for (int64_t j = 0; j < channels; ++j, x += hidden, y += hidden) {
            const int64_t tj = t * channels + j;
            float error = target[tj];
            if (erase) {
                read_out[tj] = dot(h, x, hidden) * scale;
                error -= read_out[tj];
            }
            const float coef = error * beta[t] * scale;
            error_out[tj] = error;
            coef_out[tj] = coef;
#pragma omp simd
            for (int64_t i = 0; i < hidden; ++i)
                y[i] = x[i] + coef * h[i];
        }
    }
}

/* The rewrite's backward for every token, from the upstream gradient G (the state's layout) and what the forward
 * saved (`state` and `read` are only read to erase). With k_grad_j = scale * h . G_j and w_j = beta * error_j:
 *   dv_j = beta * k_grad_j,  dbeta = sum_j error_j * k_grad_j,
 *   dh = scale * (sum_j w_j G_j - sum_j dv_j X_j) - scale^2 * (sum_j w_j k_grad_j - sum_j dv_j read_j) h,
 *   dX_j = G_j - scale * dv_j h  (erase, unless grad_state is NULL; the write-only control passes G on unchanged). */
void ddl_rewrite_backward(const float *grad, const float *state, const float *direction, const float *scale_in,
                          const float *beta, const float *read, const float *error, float *grad_state, float *grad_h,
                          float *grad_target, float *grad_beta, int64_t tokens, int64_t hidden, int64_t channels,
                          int erase, int threads)
{
#pragma omp parallel for num_threads(threads) if (threads > 1 && tokens >= 32) schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
        const float *h = direction + t * hidden, *g = grad + t * channels * hidden;
        const float scale = scale_in[t], b = beta[t];
        float *dh = grad_h + t * hidden, d_beta = 0.0f, k_dot = 0.0f;
        for (int64_t i = 0; i < hidden; ++i)
            dh[i] = 0.0f;
        for (int64_t j = 0; j < channels; ++j) {
            const int64_t tj = t * channels + j;
            const float *g_j = g + j * hidden;
            const float k_grad = dot(h, g_j, hidden) * scale, dv = b * k_grad, w = b * error[tj];
            grad_target[tj] = dv;
            d_beta += error[tj] * k_grad;
            k_dot += w * k_grad;
            if (erase) {
                const float *x_j = state + (t * channels + j) * hidden;
                k_dot -= dv * read[tj];
#pragma omp simd
                for (int64_t i = 0; i < hidden; ++i)
                    dh[i] += w * g_j[i] - dv * x_j[i];
                if (grad_state) {
                    float *dx_j = grad_state + (t * channels + j) * hidden;
                    const float write = scale * dv;
#pragma omp simd
                    for (int64_t i = 0; i < hidden; ++i)
                        dx_j[i] = g_j[i] - write * h[i];
                }
            } else {
#pragma omp simd
                for (int64_t i = 0; i < hidden; ++i)
                    dh[i] += w * g_j[i];
            }
        }
        const float h_coef = k_dot * scale * scale;
#pragma omp simd
        for (int64_t i = 0; i < hidden; ++i)
            dh[i] = dh[i] * scale - h_coef * h[i];
        grad_beta[t] = d_beta;
    }
}

/* The rewrite of every token with its target and gate computed from the context c (tokens, hidden) first:
 *   v_j = W_v[j] . c + b_v[j]  (then value_scale * sigmoid(v_j) if value_sigmoid),  beta = 2 sigmoid(w_g . c + b_g).
 * `value_bias` may be NULL; at most 64 channels. */
void ddl_projected_rewrite(const float *state, const float *direction, const float *context, const float *value_weight,
                           const float *value_bias, const float *gate_weight, const float *gate_bias, float *out,
                           int64_t tokens, int64_t hidden, int64_t channels, float eps, int erase, int value_sigmoid,
                           float value_scale, int threads)
{
#pragma omp parallel for num_threads(threads) if (threads > 1 && tokens >= 32) schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
        const float *c = context + t * hidden;
        float target[64];
        for (int64_t j = 0; j < channels; ++j) {
            float value = dot(value_weight + j * hidden, c, hidden) + (value_bias ? value_bias[j] : 0.0f);
            target[j] = value_sigmoid ? value_scale * sigmoid(value) : value;
        }
        const float beta = 2.0f * sigmoid(dot(gate_weight, c, hidden) + gate_bias[0]);
        rewrite_token(state + t * channels * hidden, direction + t * hidden, target, beta, out + t * channels * hidden,
                      hidden, channels, eps, erase);
    }
}

/* CC's read of every token: out_i = sum_j w[i][j] X_j[i], with the weight (hidden, channels). */
void ddl_channel_mix(const float *state, const float *weight, float *out, int64_t tokens, int64_t hidden,
                     int64_t channels, int threads)
{
#pragma omp parallel for num_threads(threads) if (threads > 1 && tokens >= 32) schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
        const float *x = state + t * channels * hidden;
        float *y = out + t * hidden;
        for (int64_t i = 0; i < hidden; ++i) {
            float sum = 0.0f;
            for (int64_t j = 0; j < channels; ++j)
                sum += weight[i * channels + j] * x[j * hidden + i];
            y[i] = sum;
        }
    }
}

/* The backward of CC's read, from its gradient g (tokens, hidden) and the weight as rows (channels, hidden):
 *   dX_j[i] = g[i] w[i][j]  (channel-major; skipped if grad_state is NULL),
 *   dw[i][j] = sum over tokens of g[i] X_j[i]  (skipped if grad_weight is NULL; `partial` holds threads * hidden *
 *   channels doubles, one sum per thread, added up at the end). */
void ddl_channel_mix_backward(const float *grad, const float *state, const float *weight_rows, float *grad_state,
                              float *grad_weight, double *partial, int64_t tokens, int64_t hidden, int64_t channels,
                              int threads)
{
    const int64_t size = hidden * channels;
    if (threads < 1 || tokens < 32)
        threads = 1;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t part = 0; part < threads; ++part) {
        double *sum = grad_weight ? partial + part * size : NULL;
        for (int64_t k = 0; sum && k < size; ++k)
            sum[k] = 0.0;
        for (int64_t t = tokens * part / threads; t < tokens * (part + 1) / threads; ++t) {
            const float *g = grad + t * hidden;
            for (int64_t j = 0; j < channels; ++j) {
                const float *x = state + (t * channels + j) * hidden, *w = weight_rows + j * hidden;
                if (grad_state) {
                    float *dx = grad_state + (t * channels + j) * hidden;
#pragma omp simd
                    for (int64_t i = 0; i < hidden; ++i)
                        dx[i] = g[i] * w[i];
                }
                if (grad_weight) {
                    double *dw = sum + j * hidden;
#pragma omp simd
                    for (int64_t i = 0; i < hidden; ++i)
                        dw[i] += (double)(g[i] * x[i]);
                }
            }
        }
    }
    if (grad_weight)
        for (int64_t i = 0; i < hidden; ++i)
            for (int64_t j = 0; j < channels; ++j) {
                double total = 0.0;
                for (int64_t part = 0; part < threads; ++part)
                    total += partial[part * size + j * hidden + i];
                grad_weight[i * channels + j] = (float)total;
            }
}

/* TC's read of one new token per sequence, from its window: the K - 1 states before it (`history`, element
 * (b, k, i, j) at b * stride_b + k * stride_k + i * stride_i + j * stride_j) and its own state (channel-major, one
 * token per sequence):
 *   out_i = sum_j sum_k (w[i * channels + j][k] * read_j) * window_k[i][j]
 * with the depthwise convolution weight (hidden * channels, kernel_size). */
void ddl_token_mix_step(const float *state, const float *history, const float *conv_weight, const float *read,
                        float *out, int64_t stride_b, int64_t stride_k, int64_t stride_i, int64_t stride_j,
                        int64_t batch, int64_t hidden, int64_t channels, int64_t kernel_size)
{
    for (int64_t b = 0; b < batch; ++b)
        for (int64_t i = 0; i < hidden; ++i) {
            float sum = 0.0f;
            for (int64_t j = 0; j < channels; ++j) {
                const float *taps = conv_weight + (i * channels + j) * kernel_size;
                const float *past = history + b * stride_b + i * stride_i + j * stride_j;
                for (int64_t k = 0; k + 1 < kernel_size; ++k)
                    sum += (taps[k] * read[j]) * past[k * stride_k];
                sum += (taps[kernel_size - 1] * read[j]) * state[(b * channels + j) * hidden + i];
            }
            out[b * hidden + i] = sum;
        }
}

/* EC of one new token per sequence: its state (channel-major) from its window of embeddings (batch, kernel_size,
 * hidden), contiguous: X_j[i] = sum_k w[i * channels + j][k] * e_k[i]. */
void ddl_expansion_step(const float *window, const float *conv_weight, float *out, int64_t batch, int64_t hidden,
                        int64_t channels, int64_t kernel_size)
{
    for (int64_t b = 0; b < batch; ++b)
        for (int64_t j = 0; j < channels; ++j)
            for (int64_t i = 0; i < hidden; ++i) {
                const float *taps = conv_weight + (i * channels + j) * kernel_size;
                float sum = 0.0f;
                for (int64_t k = 0; k < kernel_size; ++k)
                    sum += taps[k] * window[(b * kernel_size + k) * hidden + i];
                out[(b * channels + j) * hidden + i] = sum;
            }
}
