// The decoding kernels of cpu_kernels.c as PyTorch C++ functions: the same C code, called with tensors instead of
// through ctypes, so that a call costs one C++ entry instead of Python checks and ctypes' argument conversion.
// Built on request by cpu_kernels.build_extension(); each function returns an undefined tensor (None in Python) where
// it does not take its inputs, exactly where the ctypes wrappers of cpu_kernels.py return None.
#include <torch/extension.h>

extern "C" {
#include "cpu_kernels.c"
}

namespace {

constexpr int64_t kMaxChannels = 64;  // the projected rewrite keeps a token's target on the stack

// A float32 CPU tensor with its own strided storage and data (not a fake tensor), read as stored (no lazy negation).
bool plain_float32_cpu(const torch::Tensor &tensor)
{
    return tensor.defined() && tensor.layout() == torch::kStrided && tensor.device().is_cpu() &&
           tensor.scalar_type() == torch::kFloat && tensor.has_storage() &&
           (tensor.numel() == 0 || tensor.storage().data() != nullptr) && !tensor.is_neg() && !tensor.is_conj();
}

// A (..., d, d_v) state whose channels are rows of d floats (the transposed view is contiguous).
bool channel_major(const torch::Tensor &state) { return state.dim() >= 2 && state.mT().is_contiguous(); }

}  // namespace

torch::Tensor projected_rewrite(const torch::Tensor &state, const torch::Tensor &direction, const torch::Tensor &context,
                                const torch::Tensor &value_weight, const std::optional<torch::Tensor> &value_bias,
                                const torch::Tensor &gate_weight, const torch::Tensor &gate_bias, double eps,
                                bool erase, std::optional<double> value_scale)
{
    for (const auto *tensor : {&direction, &context, &value_weight, &gate_weight, &gate_bias})
        if (!plain_float32_cpu(*tensor) || !tensor->is_contiguous())
            return {};
    if (value_bias && (!plain_float32_cpu(*value_bias) || !value_bias->is_contiguous()))
        return {};
    if (!plain_float32_cpu(state) || direction.dim() == 0)
        return {};
    const int64_t hidden = direction.size(-1);
    const bool scalar = state.dim() == direction.dim();
    if (scalar ? !(state.sizes() == direction.sizes() && state.is_contiguous())
               : !(state.dim() == direction.dim() + 1 && state.sizes().slice(0, state.dim() - 1) == direction.sizes() &&
                   channel_major(state)))
        return {};
    const int64_t channels = scalar ? 1 : state.size(-1);
    const bool shapes_match = context.sizes() == direction.sizes() && value_weight.dim() == 2 &&
                              value_weight.size(0) == channels && value_weight.size(1) == hidden &&
                              gate_weight.dim() == 2 && gate_weight.size(0) == 1 && gate_weight.size(1) == hidden &&
                              gate_bias.dim() == 1 && gate_bias.size(0) == 1 &&
                              (!value_bias || (value_bias->dim() == 1 && value_bias->size(0) == channels));
    if (channels > kMaxChannels || !shapes_match)
        return {};
    auto out = torch::empty_like(state);  // keeps the channel-major strides
    const int64_t tokens = hidden ? direction.numel() / hidden : 0;
    ddl_projected_rewrite(state.data_ptr<float>(), direction.data_ptr<float>(), context.data_ptr<float>(),
                          value_weight.data_ptr<float>(), value_bias ? value_bias->data_ptr<float>() : nullptr,
                          gate_weight.data_ptr<float>(), gate_bias.data_ptr<float>(), out.data_ptr<float>(), tokens,
                          hidden, channels, static_cast<float>(eps), erase, value_scale.has_value(),
                          static_cast<float>(value_scale.value_or(1.0)), at::get_num_threads());
    return out;
}

torch::Tensor channel_mix(const torch::Tensor &state, const torch::Tensor &weight)
{
    if (state.dim() < 2 || weight.dim() != 2 || state.size(-2) != weight.size(0) || state.size(-1) != weight.size(1))
        return {};
    if (!plain_float32_cpu(state) || !plain_float32_cpu(weight) || !weight.is_contiguous() || !channel_major(state))
        return {};
    const int64_t hidden = weight.size(0), channels = weight.size(1);
    auto out = torch::empty(state.sizes().slice(0, state.dim() - 1), state.options());
    const int64_t tokens = hidden ? out.numel() / hidden : 0;
    ddl_channel_mix(state.data_ptr<float>(), weight.data_ptr<float>(), out.data_ptr<float>(), tokens, hidden, channels,
                    at::get_num_threads());
    return out;
}

torch::Tensor expansion_step(const torch::Tensor &window, const torch::Tensor &conv_weight)
{
    if (window.dim() != 3 || conv_weight.dim() != 3 || !plain_float32_cpu(window) || !plain_float32_cpu(conv_weight) ||
        !conv_weight.is_contiguous())
        return {};
    const int64_t batch = window.size(0), kernel_size = window.size(1), hidden = window.size(2);
    if (conv_weight.size(0) % std::max<int64_t>(hidden, 1) || conv_weight.size(1) != 1 ||
        conv_weight.size(2) != kernel_size)
        return {};
    const int64_t channels = hidden ? conv_weight.size(0) / hidden : 0;
    auto out = torch::empty({batch, 1, channels, hidden}, window.options());
    ddl_expansion_step(window.data_ptr<float>(), conv_weight.data_ptr<float>(), out.data_ptr<float>(), window.stride(0),
                       window.stride(1), window.stride(2), batch, hidden, channels, kernel_size);
    return out.transpose(-1, -2);  // (B, 1, d, d_v), channel-major
}

torch::Tensor token_mix_step(const torch::Tensor &state, const torch::Tensor &conv_weight, const torch::Tensor &read,
                             const torch::Tensor &history)
{
    if (state.dim() != 4 || state.size(1) != 1 || conv_weight.dim() != 3 || history.dim() != 4 || read.dim() != 1)
        return {};
    for (const auto *tensor : {&state, &conv_weight, &read, &history})
        if (!plain_float32_cpu(*tensor))
            return {};
    const int64_t batch = state.size(0), hidden = state.size(2), channels = state.size(3);
    const int64_t kernel_size = conv_weight.size(2);
    const bool shapes_match = history.size(0) == batch && history.size(1) == kernel_size - 1 &&
                              history.size(2) == hidden && history.size(3) == channels &&
                              conv_weight.size(0) == hidden * channels && conv_weight.size(1) == 1 &&
                              read.size(0) == channels;
    if (!shapes_match || !conv_weight.is_contiguous() || !read.is_contiguous() || !channel_major(state))
        return {};
    auto out = torch::empty({batch, 1, hidden}, state.options());
    ddl_token_mix_step(state.data_ptr<float>(), history.data_ptr<float>(), conv_weight.data_ptr<float>(),
                       read.data_ptr<float>(), out.data_ptr<float>(), history.stride(0), history.stride(1),
                       history.stride(2), history.stride(3), batch, hidden, channels, kernel_size);
    return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module)
{
    module.def("projected_rewrite", &projected_rewrite, "cpu_kernels.projected_rewrite as one C++ call");
    module.def("channel_mix", &channel_mix, "cpu_kernels.channel_mix as one C++ call");
    module.def("expansion_step", &expansion_step, "cpu_kernels.expansion_step as one C++ call");
    module.def("token_mix_step", &token_mix_step, "cpu_kernels.token_mix_step as one C++ call");
}
