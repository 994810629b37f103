/* DDL's CPU kernels (float32), built on first use by cpu_kernels.py and called through ctypes.
 *
 * A state of `tokens` tokens is channel-major: channel j of token t is a row of `hidden` floats at
 * state + (t * channels + j) * hidden. A scalar state is the case channels == 1. Outputs may not alias inputs.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

/* a . b with 16 partial sums (vectorised, and not one chain of dependent additions). */
static float dot(const float *a, const float *b, int64_t n)
{
    float partial[16] = {0.0f};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; ++l)
            partial[l] += a[i + l] * b[i + l];
    float sum = 0.0f;
    for (; i < n; ++i)
        sum += a[i] * b[i];
    for (int l = 0; l < 16; ++l)
        sum += partial[l];
    return sum;
}

static float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

#define TILE 16 /* tokens whose products add_products sums in registers before adding them to a double */

/* out[m] = sum over the threads' parts of partial[part * size + m], for m < size. */
static void add_up_parts(const double *partial, int64_t parts, int64_t size, float *out)
{
    for (int64_t m = 0; m < size; ++m) {
        double total = 0.0;
        for (int64_t part = 0; part < parts; ++part)
            total += partial[part * size + m];
        out[m] = (float)total;
    }
}

/* sum[i] += sum over n < count of a[n * a_stride + i] * b[n * b_stride + i]: the weight gradients' sums over tokens,
 * 16 features at a time, each summed over the `count` (at most TILE) tokens in float first. */
static void add_products(double *sum, const float *a, int64_t a_stride, const float *b, int64_t b_stride,
                         int64_t count, int64_t hidden)
{
    int64_t i = 0;
    for (; i + 16 <= hidden; i += 16) {
        float partial[16] = {0.0f};
        for (int64_t n = 0; n < count; ++n)
            for (int l = 0; l < 16; ++l)
                partial[l] += a[n * a_stride + i + l] * b[n * b_stride + i + l];
        for (int l = 0; l < 16; ++l)
            sum[i + l] += partial[l];
    }
    for (; i < hidden; ++i) {
        float partial = 0.0f;
        for (int64_t n = 0; n < count; ++n)
            partial += a[n * a_stride + i] * b[n * b_stride + i];
        sum[i] += partial;
    }
}

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

/* One token's rewrite for training: also writes what backward and the state tape need: its `scale`, and per channel
 * `read` (scale * h . X_j, erase only), `error` (v_j - read_j) and `coef` (c_j). */
static void rewrite_token_forward(const float *x, const float *h, const float *target, float beta, float *y,
                                  float *scale_out, float *read, float *error_out, float *coef_out, int64_t hidden,
                                  int64_t channels, float eps, int erase)
{
    const float scale = 1.0f / sqrtf(dot(h, h, hidden) + eps * eps);
    *scale_out = scale;
    for (int64_t j = 0; j < channels; ++j, x += hidden, y += hidden) {
        float error = target[j];
        if (erase) {
            read[j] = dot(h, x, hidden) * scale;
            error -= read[j];
        }
        const float coef = error * beta * scale;
        error_out[j] = error;
        coef_out[j] = coef;
#pragma omp simd
        for (int64_t i = 0; i < hidden; ++i)
            y[i] = x[i] + coef * h[i];
    }
}

/* The rewrite of every token for training, given its target (tokens, channels) and gate (tokens,); see
 * rewrite_token_forward for the per-token outputs. */
void ddl_rewrite_forward(const float *state, const float *direction, const float *target, const float *beta,
                         float *out, float *scale_out, float *read_out, float *error_out, float *coef_out,
                         int64_t tokens, int64_t hidden, int64_t channels, float eps, int erase, int threads)
{
#pragma omp parallel for num_threads(threads) if (threads > 1 && tokens >= 32) schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
        const int64_t row = t * channels;
        rewrite_token_forward(state + row * hidden, direction + t * hidden, target + row, beta[t], out + row * hidden,
                              scale_out + t, erase ? read_out + row : NULL, error_out + row, coef_out + row, hidden,
                              channels, eps, erase);
    }
}

/* One token's rewrite backward, from the upstream gradient G (channel rows) and what the forward saved (`x` and
 * `read` are only read to erase). With k_grad_j = scale * h . G_j and w_j = beta * error_j:
 *   dv_j = beta * k_grad_j,  dbeta = sum_j error_j * k_grad_j,
 *   dh = scale * (sum_j w_j G_j - sum_j dv_j X_j) - scale^2 * (sum_j w_j k_grad_j - sum_j dv_j read_j) h,
 *   dX_j = G_j - scale * dv_j h  (erase, unless dx is NULL; the write-only control passes G on unchanged).
 * Returns dbeta. */
static float rewrite_token_backward(const float *g, const float *x, const float *h, float scale, float beta,
                                    const float *read, const float *error, float *dx, float *dh, float *dv,
                                    int64_t hidden, int64_t channels, int erase)
{
    float d_beta = 0.0f, k_dot = 0.0f;
    for (int64_t i = 0; i < hidden; ++i)
        dh[i] = 0.0f;
    for (int64_t j = 0; j < channels; ++j, g += hidden) {
        const float k_grad = dot(h, g, hidden) * scale, w = beta * error[j];
        dv[j] = beta * k_grad;
        d_beta += error[j] * k_grad;
        k_dot += w * k_grad;
        if (erase) {
            const float *x_j = x + j * hidden, dv_j = dv[j];
            k_dot -= dv_j * read[j];
#pragma omp simd
            for (int64_t i = 0; i < hidden; ++i)
                dh[i] += w * g[i] - dv_j * x_j[i];
            if (dx) {
                float *dx_j = dx + j * hidden;
                const float write = scale * dv_j;
#pragma omp simd
                for (int64_t i = 0; i < hidden; ++i)
                    dx_j[i] = g[i] - write * h[i];
            }
        } else {
#pragma omp simd
            for (int64_t i = 0; i < hidden; ++i)
                dh[i] += w * g[i];
        }
    }
    const float h_coef = k_dot * scale * scale;
#pragma omp simd
    for (int64_t i = 0; i < hidden; ++i)
        dh[i] = dh[i] * scale - h_coef * h[i];
    return d_beta;
}

/* The rewrite's backward for every token (see rewrite_token_backward), writing the target's gradient (tokens,
 * channels) and the gate's (tokens,). */
void ddl_rewrite_backward(const float *grad, const float *state, const float *direction, const float *scale_in,
                          const float *beta, const float *read, const float *error, float *grad_state, float *grad_h,
                          float *grad_target, float *grad_beta, int64_t tokens, int64_t hidden, int64_t channels,
                          int erase, int threads)
{
#pragma omp parallel for num_threads(threads) if (threads > 1 && tokens >= 32) schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
        const int64_t row = t * channels;
        grad_beta[t] = rewrite_token_backward(
            grad + row * hidden, erase ? state + row * hidden : NULL, direction + t * hidden, scale_in[t], beta[t],
            erase ? read + row : NULL, error + row, grad_state ? grad_state + row * hidden : NULL, grad_h + t * hidden,
            grad_target + row, hidden, channels, erase);
    }
}

/* A token's target and gate from its context c (hidden,), returning beta:
 *   v_j = W_v[j] . c + b_v[j]  (then value_scale * sigmoid(v_j) if value_sigmoid),  beta = 2 sigmoid(w_g . c + b_g).
 * `value_bias` may be NULL. */
static float project_token(const float *c, const float *value_weight, const float *value_bias,
                           const float *gate_weight, const float *gate_bias, float *target, int64_t hidden,
                           int64_t channels, int value_sigmoid, float value_scale)
{
    for (int64_t j = 0; j < channels; ++j) {
        float value = dot(value_weight + j * hidden, c, hidden) + (value_bias ? value_bias[j] : 0.0f);
        target[j] = value_sigmoid ? value_scale * sigmoid(value) : value;
    }
    return 2.0f * sigmoid(dot(gate_weight, c, hidden) + gate_bias[0]);
}

/* The rewrite of every token with its target and gate computed from the context c (tokens, hidden) first (see
 * project_token); at most 64 channels. */
void ddl_projected_rewrite(const float *state, const float *direction, const float *context, const float *value_weight,
                           const float *value_bias, const float *gate_weight, const float *gate_bias, float *out,
                           int64_t tokens, int64_t hidden, int64_t channels, float eps, int erase, int value_sigmoid,
                           float value_scale, int threads)
{
#pragma omp parallel for num_threads(threads) if (threads > 1 && tokens >= 32) schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
        float target[64];
        const float beta = project_token(context + t * hidden, value_weight, value_bias, gate_weight, gate_bias,
                                         target, hidden, channels, value_sigmoid, value_scale);
        rewrite_token(state + t * channels * hidden, direction + t * hidden, target, beta, out + t * channels * hidden,
                      hidden, channels, eps, erase);
    }
}

/* The projected rewrite for training: the target and gate from the context as in ddl_projected_rewrite, then the
 * rewrite as in ddl_rewrite_forward; writes each token's gate `beta_out` (tokens,) and, where ddl_rewrite_forward
 * writes the error, the target itself (`target_out`: backward needs both, and the error v - read is recomputed
 * exactly from them, where v rebuilt as error + read would lose v's low digits against a large reading). */
void ddl_projected_rewrite_forward(const float *state, const float *direction, const float *context,
                                   const float *value_weight, const float *value_bias, const float *gate_weight,
                                   const float *gate_bias, float *out, float *beta_out, float *scale_out,
                                   float *read_out, float *target_out, float *coef_out, int64_t tokens, int64_t hidden,
                                   int64_t channels, float eps, int erase, int value_sigmoid, float value_scale,
                                   int threads)
{
#pragma omp parallel for num_threads(threads) if (threads > 1 && tokens >= 32) schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
        const int64_t row = t * channels;
        float error[64];
        beta_out[t] = project_token(context + t * hidden, value_weight, value_bias, gate_weight, gate_bias,
                                    target_out + row, hidden, channels, value_sigmoid, value_scale);
        rewrite_token_forward(state + row * hidden, direction + t * hidden, target_out + row, beta_out[t],
                              out + row * hidden, scale_out + t, erase ? read_out + row : NULL, error, coef_out + row,
                              hidden, channels, eps, erase);
    }
}

/* The projected rewrite's backward: the rewrite's (rewrite_token_backward, with the error v - read recomputed as the
 * forward computed it), then through the activations, to the gradients of the projections' outputs (tokens,
 * channels + 1): with z_j the value projection's output (v_j = value_scale * sigmoid(z_j), or z_j) and z_g the gate's,
 *   dz_j = dv_j * v_j * (1 - v_j / value_scale)  (dv_j if linear),  dz_g = dbeta * beta * (1 - beta / 2).
 * At most 64 channels. */
void ddl_projected_rewrite_backward(const float *grad, const float *state, const float *direction,
                                    const float *scale_in, const float *beta, const float *read, const float *target,
                                    float *grad_state, float *grad_h, float *grad_logits, int64_t tokens,
                                    int64_t hidden, int64_t channels, int erase, int value_sigmoid, float value_scale,
                                    int threads)
{
#pragma omp parallel for num_threads(threads) if (threads > 1 && tokens >= 32) schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
        const int64_t row = t * channels;
        const float *v = target + row;
        float *dz = grad_logits + t * (channels + 1), error[64];
        for (int64_t j = 0; j < channels; ++j)
            error[j] = erase ? v[j] - read[row + j] : v[j];
        const float d_beta = rewrite_token_backward(
            grad + row * hidden, erase ? state + row * hidden : NULL, direction + t * hidden, scale_in[t], beta[t],
            erase ? read + row : NULL, error, grad_state ? grad_state + row * hidden : NULL, grad_h + t * hidden, dz,
            hidden, channels, erase);
        for (int64_t j = 0; value_sigmoid && j < channels; ++j)
            dz[j] *= v[j] * (1.0f - v[j] / value_scale);
        dz[channels] = d_beta * beta[t] * (1.0f - 0.5f * beta[t]);
    }
}

/* CC's read of every token: out_i = sum_j w[i][j] X_j[i], with the weight (hidden, channels). The loops run along
 * the features, over the weight's columns w[:, j] as rows (`rows`, channels * hidden floats). */
static void channel_mix_rows(const float *state, const float *rows, float *out, int64_t tokens, int64_t hidden,
                             int64_t channels, int threads)
{
#pragma omp parallel for num_threads(threads) if (threads > 1 && tokens >= 32) schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
        const float *x = state + t * channels * hidden;
        float *y = out + t * hidden;
        for (int64_t i = 0; i < hidden; ++i)
            y[i] = 0.0f;
        for (int64_t j = 0; j < channels; ++j) {
            const float *w = rows + j * hidden, *x_j = x + j * hidden;
#pragma omp simd
            for (int64_t i = 0; i < hidden; ++i)
                y[i] += w[i] * x_j[i];
        }
    }
}

void ddl_channel_mix(const float *state, const float *weight, float *out, int64_t tokens, int64_t hidden,
                     int64_t channels, int threads)
{
    float on_stack[4096];
    const int64_t size = hidden * channels;
    float *rows = size <= 4096 ? on_stack : (float *)malloc(sizeof(float) * (size_t)size);
    if (!rows) { /* out of memory for the copy: one feature at a time over the weight as it is */
        for (int64_t t = 0; t < tokens; ++t)
            for (int64_t i = 0; i < hidden; ++i) {
                float sum = 0.0f;
                for (int64_t j = 0; j < channels; ++j)
                    sum += weight[i * channels + j] * state[(t * channels + j) * hidden + i];
                out[t * hidden + i] = sum;
            }
        return;
    }
    for (int64_t i = 0; i < hidden; ++i)
        for (int64_t j = 0; j < channels; ++j)
            rows[j * hidden + i] = weight[i * channels + j];
    channel_mix_rows(state, rows, out, tokens, hidden, channels, threads);
    if (rows != on_stack)
        free(rows);
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
        const int64_t last = tokens * (part + 1) / threads;
        double *sum = grad_weight ? partial + part * size : NULL;
        for (int64_t k = 0; sum && k < size; ++k)
            sum[k] = 0.0;
        for (int64_t t = tokens * part / threads; t < last; t += TILE) {
            const int64_t count = last - t < TILE ? last - t : TILE;
            for (int64_t n = t; grad_state && n < t + count; ++n)
                for (int64_t j = 0; j < channels; ++j) {
                    const float *g = grad + n * hidden, *w = weight_rows + j * hidden;
                    float *dx = grad_state + (n * channels + j) * hidden;
#pragma omp simd
                    for (int64_t i = 0; i < hidden; ++i)
                        dx[i] = g[i] * w[i];
                }
            for (int64_t j = 0; sum && j < channels; ++j)
                add_products(sum + j * hidden, grad + t * hidden, hidden, state + (t * channels + j) * hidden,
                             channels * hidden, count, hidden);
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

/* EC of one new token per sequence: its state (channel-major) from its window of embeddings, the kernel_size
 * embeddings up to its own, element (b, k, i) at b * stride_b + k * stride_k + i * stride_i (any layout: the cache keeps
 * them time last):  X_j[i] = sum_k w[i * channels + j][k] * e_k[i]. */
void ddl_expansion_step(const float *window, const float *conv_weight, float *out, int64_t stride_b, int64_t stride_k,
                        int64_t stride_i, int64_t batch, int64_t hidden, int64_t channels, int64_t kernel_size)
{
    for (int64_t b = 0; b < batch; ++b)
        for (int64_t i = 0; i < hidden; ++i) {
            const float *embeddings = window + b * stride_b + i * stride_i;
            for (int64_t j = 0; j < channels; ++j) {
                const float *taps = conv_weight + (i * channels + j) * kernel_size;
                float sum = 0.0f;
                for (int64_t k = 0; k < kernel_size; ++k)
                    sum += taps[k] * embeddings[k * stride_k];
                out[(b * channels + j) * hidden + i] = sum;
            }
        }
}

/* EC for training: the states of `seq_len` tokens per sequence (channel-major) from the window of embeddings (batch,
 * seq_len + kernel_size - 1, hidden) and the taps (kernel_size, channels, hidden), contiguous:
 *   X_j[t] = sum_k taps[k][j] * e[t + k]  (elementwise over the features). */
void ddl_expansion_forward(const float *window, const float *taps, float *out, int64_t batch, int64_t seq_len,
                           int64_t hidden, int64_t channels, int64_t kernel_size, int threads)
{
    const int64_t length = seq_len + kernel_size - 1, tokens = batch * seq_len;
#pragma omp parallel for num_threads(threads) if (threads > 1 && tokens >= 32) schedule(static)
    for (int64_t n = 0; n < tokens; ++n) {
        const float *e = window + (n / seq_len * length + n % seq_len) * hidden;
        for (int64_t j = 0; j < channels; ++j) {
            float *y = out + (n * channels + j) * hidden;
            const float *w = taps + j * hidden;
#pragma omp simd
            for (int64_t i = 0; i < hidden; ++i)
                y[i] = w[i] * e[i];
            for (int64_t k = 1; k < kernel_size; ++k) {
                const float *w_k = w + k * channels * hidden, *e_k = e + k * hidden;
#pragma omp simd
                for (int64_t i = 0; i < hidden; ++i)
                    y[i] += w_k[i] * e_k[i];
            }
        }
    }
}

/* The backward of ddl_expansion_forward from the states' gradient G (channel-major rows, contiguous):
 *   de[p] = sum over taps k with 0 <= p - k < seq_len of sum_j taps[k][j] * G_j[p - k]  (skipped if grad_window is
 *   NULL), dtaps[k][j] = sum over sequences and tokens t of G_j[t] * e[t + k]  (skipped if grad_taps is NULL;
 *   `partial` holds threads * kernel_size * channels * hidden doubles, one sum per thread, added up at the end). */
void ddl_expansion_backward(const float *grad, const float *window, const float *taps, float *grad_window,
                            float *grad_taps, double *partial, int64_t batch, int64_t seq_len, int64_t hidden,
                            int64_t channels, int64_t kernel_size, int threads)
{
    const int64_t length = seq_len + kernel_size - 1, tokens = batch * seq_len, size = kernel_size * channels * hidden;
    if (threads < 1 || tokens < 32)
        threads = 1;
    if (grad_window) {
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
        for (int64_t n = 0; n < batch * length; ++n) {
            const int64_t b = n / length, p = n % length;
            float *de = grad_window + n * hidden;
            for (int64_t i = 0; i < hidden; ++i)
                de[i] = 0.0f;
            for (int64_t k = 0; k < kernel_size; ++k) {
                const int64_t t = p - k;
                if (t < 0 || t >= seq_len)
                    continue;
                for (int64_t j = 0; j < channels; ++j) {
                    const float *g = grad + ((b * seq_len + t) * channels + j) * hidden;
                    const float *w = taps + (k * channels + j) * hidden;
#pragma omp simd
                    for (int64_t i = 0; i < hidden; ++i)
                        de[i] += w[i] * g[i];
                }
            }
        }
    }
    if (!grad_taps)
        return;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t part = 0; part < threads; ++part) {
        double *sum = partial + part * size;
        for (int64_t m = 0; m < size; ++m)
            sum[m] = 0.0;
        const int64_t last = tokens * (part + 1) / threads;
        for (int64_t n = tokens * part / threads, count; n < last; n += count) {
            const int64_t t = n % seq_len, left = seq_len - t < last - n ? seq_len - t : last - n;
            const float *e = window + (n / seq_len * length + t) * hidden;  /* tiles stay within a sequence */
            count = left < TILE ? left : TILE;
            for (int64_t k = 0; k < kernel_size; ++k)
                for (int64_t j = 0; j < channels; ++j)
                    add_products(sum + (k * channels + j) * hidden, grad + (n * channels + j) * hidden,
                                 channels * hidden, e + k * hidden, hidden, count, hidden);
        }
    }
    add_up_parts(partial, threads, size, grad_taps);
}

/* TC's token convolution for training: out[t] = sum over taps k and channels j of w[k][j] * X_j[t + k - padding]
 * (elementwise over the features; positions before the window read zeros), from the window (batch, length,
 * channels, hidden) and the kernel (kernel_size, channels, hidden), both contiguous; out (batch, seq_len, hidden) with
 * seq_len = length + padding - kernel_size + 1. */
void ddl_token_conv_forward(const float *window, const float *weight, float *out, int64_t batch, int64_t length,
                            int64_t hidden, int64_t channels, int64_t kernel_size, int64_t padding, int threads)
{
    const int64_t seq_len = length + padding - kernel_size + 1, tokens = batch * seq_len, row = channels * hidden;
#pragma omp parallel for num_threads(threads) if (threads > 1 && tokens >= 32) schedule(static)
    for (int64_t n = 0; n < tokens; ++n) {
        const int64_t b = n / seq_len, t = n % seq_len;
        float *y = out + n * hidden;
        for (int64_t i = 0; i < hidden; ++i)
            y[i] = 0.0f;
        for (int64_t k = 0; k < kernel_size; ++k) {
            const int64_t p = t + k - padding;
            if (p < 0 || p >= length)
                continue;
            const float *x = window + (b * length + p) * row, *w = weight + k * row;
            for (int64_t j = 0; j < channels; ++j) {
                const float *x_j = x + j * hidden, *w_j = w + j * hidden;
#pragma omp simd
                for (int64_t i = 0; i < hidden; ++i)
                    y[i] += w_j[i] * x_j[i];
            }
        }
    }
}

/* The backward of ddl_token_conv_forward from the output's gradient g (batch, seq_len, hidden), contiguous:
 *   dX_j[p] = sum over taps k with 0 <= p - k + padding < seq_len of w[k][j] * g[p - k + padding]  (skipped if
 *   grad_window is NULL), dw[k][j] = sum over sequences and tokens t of g[t] * X_j[t + k - padding]  (skipped if
 *   grad_weight is NULL; `partial` holds threads * kernel_size * channels * hidden doubles, one sum per thread). */
void ddl_token_conv_backward(const float *grad, const float *window, const float *weight, float *grad_window,
                             float *grad_weight, double *partial, int64_t batch, int64_t length, int64_t hidden,
                             int64_t channels, int64_t kernel_size, int64_t padding, int threads)
{
    const int64_t seq_len = length + padding - kernel_size + 1, tokens = batch * seq_len, row = channels * hidden;
    const int64_t size = kernel_size * row;
    if (threads < 1 || tokens < 32)
        threads = 1;
    if (grad_window) {
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
        for (int64_t n = 0; n < batch * length; ++n) {
            const int64_t b = n / length, p = n % length;
            float *dx = grad_window + n * row;
            for (int64_t m = 0; m < row; ++m)
                dx[m] = 0.0f;
            for (int64_t k = 0; k < kernel_size; ++k) {
                const int64_t t = p - k + padding;
                if (t < 0 || t >= seq_len)
                    continue;
                const float *g = grad + (b * seq_len + t) * hidden, *w = weight + k * row;
                for (int64_t j = 0; j < channels; ++j) {
                    float *dx_j = dx + j * hidden;
                    const float *w_j = w + j * hidden;
#pragma omp simd
                    for (int64_t i = 0; i < hidden; ++i)
                        dx_j[i] += w_j[i] * g[i];
                }
            }
        }
    }
    if (!grad_weight)
        return;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t part = 0; part < threads; ++part) {
        double *sum = partial + part * size;
        for (int64_t m = 0; m < size; ++m)
            sum[m] = 0.0;
        const int64_t last = tokens * (part + 1) / threads;
        for (int64_t n = tokens * part / threads, count; n < last; n += count) {
            const int64_t b = n / seq_len, t = n % seq_len, left = seq_len - t < last - n ? seq_len - t : last - n;
            count = left < TILE ? left : TILE; /* tiles stay within a sequence */
            for (int64_t k = 0; k < kernel_size; ++k) {
                /* the tile's tokens t .. t + count - 1 read positions t + k - padding ..; skip those outside */
                int64_t first = t + k - padding < 0 ? padding - k - t : 0;
                int64_t stop = t + count + k - padding > length ? length - (t + k - padding) : count;
                if (first >= stop)
                    continue;
                const float *g = grad + (n + first) * hidden;
                const float *x = window + (b * length + t + first + k - padding) * row;
                for (int64_t j = 0; j < channels; ++j)
                    add_products(sum + k * row + j * hidden, g, hidden, x + j * hidden, row, stop - first, hidden);
            }
        }
    }
    add_up_parts(partial, threads, size, grad_weight);
}
