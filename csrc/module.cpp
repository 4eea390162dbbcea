// The Python module minigpt._C. The only file that includes <torch/extension.h> (slow to
// compile): kernels and their checks live in csrc/<op>.cpp and csrc/<op>.cu.
#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "MiniGPT C++ CPU and CUDA kernels; use them through minigpt.ops";
#ifdef WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  m.def("layer_norm_fwd", &minigpt::layer_norm_fwd, "LayerNorm (+residual) forward");
  m.def("layer_norm_bwd", &minigpt::layer_norm_bwd, "LayerNorm (+residual) backward");
  m.def("softmax_fwd", &minigpt::softmax_fwd, "softmax(scale * x) (causal optional) forward");
  m.def("softmax_bwd", &minigpt::softmax_bwd, "softmax backward from the saved output");
  namespace py = pybind11;
  m.def("attention_fwd", &minigpt::attention_fwd, "flash attention forward -> (out, lse)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("causal"), py::arg("scale"),
        py::arg("dropout_p") = 0.0, py::arg("seed") = 0);
  m.def("attention_bwd", &minigpt::attention_bwd, "flash attention backward -> (dq, dk, dv)",
        py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("causal"), py::arg("scale"), py::arg("dropout_p") = 0.0,
        py::arg("seed") = 0);
  m.def("decode_attention_fwd", &minigpt::decode_attention_fwd,
        "one query per sequence against its KV cache");
  m.def("rms_norm_fwd", &minigpt::rms_norm_fwd, "RMSNorm (+residual) forward");
  m.def("rms_norm_bwd", &minigpt::rms_norm_bwd, "RMSNorm (+residual) backward");
  m.def("rope", &minigpt::rope, "rotary embedding of q and k (inverse: the backward)");
  m.def("quant_matmul", &minigpt::quant_matmul, "x W^T with W in GGUF Q8_0/Q4_1 blocks (CPU)");
  m.def("swiglu_fwd", &minigpt::swiglu_fwd, "silu(gate) * up forward");
  m.def("swiglu_bwd", &minigpt::swiglu_bwd, "silu(gate) * up backward");
  m.def("cross_entropy_fwd", &minigpt::cross_entropy_fwd,
        "per-row cross-entropy loss (+ its gradient, optionally in place)");
}
