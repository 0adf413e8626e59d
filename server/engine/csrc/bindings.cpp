// The Python module of protoserve's CPU kernels. The GIL is released while a kernel runs, as torch's
// own ops do, so the server's other threads go on.

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  module.def("paged_decode_attention", &protoserve::paged_decode_attention,
             "decode attention over a paged KV cache, keys and values read in place", release());
  module.def("rms_norm", &protoserve::rms_norm, "Llama-style RMSNorm in one pass per row", release());
  module.def("add_rms_norm", &protoserve::add_rms_norm,
             "the residual add (in place) then Llama-style RMSNorm, in one pass per row", release());
  module.def("silu_mul", &protoserve::silu_mul, "silu(gate) * up of a fused gate/up product", release());
  module.def("rotary_write_kv", &protoserve::rotary_write_kv,
             "rotary embedding of q and k from a fused qkv product; k and v written to their cache slots",
             release());
}
