/* DDL's CPU kernels (float32), built on first use by cpu_kernels.py and called through ctypes.
 *
 * A state of `tokens` tokens is channel-major: channel j of token t is a row of `hidden` floats at
 * state + (t * channels + j) * hidden. A scalar state is the case channels == 1. Outputs may not alias inputs.
 */
#include <math.h>
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
