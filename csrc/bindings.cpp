// pybind11 module draftwise._C. It does not link against libtorch: the Python side passes raw
// data pointers (tensor.data_ptr() as integers), sizes and dtype codes, and owns every buffer.

#include <pybind11/pybind11.h>

#include <cstdint>

#include "skinny_linear.h"
#include "verify_chain.h"
#include "verify_tree.h"

namespace py = pybind11;

namespace {

template <class T>
T* pointer(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void verify_chain_py(uintptr_t draft_tokens_ptr, uintptr_t draft_probs_ptr, int draft_probs_dtype,
                     uintptr_t target_logits_ptr, int target_logits_dtype,
                     uintptr_t temperature_ptr, uintptr_t top_k_ptr, uintptr_t top_p_ptr,
                     uintptr_t seeds_ptr, uintptr_t accept_uniforms_ptr,
                     int accept_uniforms_dtype, uintptr_t race_uniforms_ptr,
                     int race_uniforms_dtype, int64_t batch, int64_t num_draft, int64_t vocab,
                     int lenience_kind, double lenience_epsilon, uintptr_t output_tokens_ptr,
                     uintptr_t num_accepted_ptr, int num_threads) {
  draftwise::ChainArgs a;
  a.draft_tokens_ptr = pointer<const int64_t>(draft_tokens_ptr);
  a.draft_probs_ptr = pointer<const void>(draft_probs_ptr);
  a.draft_probs_dtype = static_cast<draftwise::DType>(draft_probs_dtype);
  a.target_logits_ptr = pointer<const void>(target_logits_ptr);
  a.target_logits_dtype = static_cast<draftwise::DType>(target_logits_dtype);
  a.temperature_ptr = pointer<const float>(temperature_ptr);
  a.top_k_ptr = pointer<const int64_t>(top_k_ptr);
  a.top_p_ptr = pointer<const float>(top_p_ptr);
  a.seeds_ptr = pointer<const int64_t>(seeds_ptr);
  a.accept_uniforms_ptr = pointer<const void>(accept_uniforms_ptr);
  a.accept_uniforms_dtype = static_cast<draftwise::DType>(accept_uniforms_dtype);
  a.race_uniforms_ptr = pointer<const void>(race_uniforms_ptr);
  a.race_uniforms_dtype = static_cast<draftwise::DType>(race_uniforms_dtype);
  a.batch = batch;
  a.num_draft = num_draft;
  a.vocab = vocab;
  a.lenience_kind = static_cast<draftwise::Lenience>(lenience_kind);
  a.lenience_epsilon = lenience_epsilon;
  a.num_threads = num_threads;
  a.output_tokens_ptr = pointer<int64_t>(output_tokens_ptr);
  a.num_accepted_ptr = pointer<int64_t>(num_accepted_ptr);
  py::gil_scoped_release release;
  draftwise::verify_chain(a);
}

void verify_tree_py(uintptr_t tree_tokens_ptr, uintptr_t parents_ptr, uintptr_t draft_probs_ptr,
                    int draft_probs_dtype, uintptr_t target_logits_ptr, int target_logits_dtype,
                    uintptr_t temperature_ptr, uintptr_t top_k_ptr, uintptr_t top_p_ptr,
                    uintptr_t seeds_ptr, int64_t batch, int64_t num_nodes, int64_t vocab,
                    uintptr_t path_ptr, uintptr_t output_tokens_ptr, uintptr_t num_accepted_ptr,
                    uintptr_t max_depth_ptr, int num_threads) {
  draftwise::TreeArgs a;
  a.tree_tokens_ptr = pointer<const int64_t>(tree_tokens_ptr);
  a.parents_ptr = pointer<const int64_t>(parents_ptr);
  a.draft_probs_ptr = pointer<const void>(draft_probs_ptr);
  a.draft_probs_dtype = static_cast<draftwise::DType>(draft_probs_dtype);
  a.target_logits_ptr = pointer<const void>(target_logits_ptr);
  a.target_logits_dtype = static_cast<draftwise::DType>(target_logits_dtype);
  a.temperature_ptr = pointer<const float>(temperature_ptr);
  a.top_k_ptr = pointer<const int64_t>(top_k_ptr);
  a.top_p_ptr = pointer<const float>(top_p_ptr);
  a.seeds_ptr = pointer<const int64_t>(seeds_ptr);
  a.batch = batch;
  a.num_nodes = num_nodes;
  a.vocab = vocab;
  a.num_threads = num_threads;
  a.path_ptr = pointer<int64_t>(path_ptr);
  a.output_tokens_ptr = pointer<int64_t>(output_tokens_ptr);
  a.num_accepted_ptr = pointer<int64_t>(num_accepted_ptr);
  a.max_depth_ptr = pointer<int64_t>(max_depth_ptr);
  py::gil_scoped_release release;
  draftwise::verify_tree(a);
}

void philox_uniforms_py(int64_t seed, uint32_t c0_start, uint32_t c1, uint32_t c2, int64_t n,
                        uintptr_t out_ptr) {
  py::gil_scoped_release release;
  draftwise::philox_uniforms(static_cast<uint64_t>(seed), c0_start, c1, c2, n,
                             pointer<float>(out_ptr));
}

void skinny_linear_py(uintptr_t x_ptr, uintptr_t weight_ptr, uintptr_t bias_ptr, uintptr_t y_ptr,
                      int64_t m, int64_t n, int64_t k, int isa, int num_threads) {
  draftwise::SkinnyLinearArgs a;
  a.x = pointer<const float>(x_ptr);
  a.weight = pointer<const float>(weight_ptr);
  a.bias = pointer<const float>(bias_ptr);
  a.y = pointer<float>(y_ptr);
  a.m = m;
  a.n = n;
  a.k = k;
  a.isa = static_cast<draftwise::SkinnyIsa>(isa);
  a.num_threads = num_threads;
  py::gil_scoped_release release;
  draftwise::skinny_linear(a);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "draftwise C++ CPU kernels (raw-pointer interface; see draftwise/kernels/chain_cpp.py and tree_cpp.py)";
  m.def("verify_chain", &verify_chain_py,
        "Chain verification on contiguous CPU buffers. Pointers are addresses (0 = absent); "
        "dtype codes: 0 float32, 1 float64, 2 float16, 3 bfloat16.",
        py::arg("draft_tokens_ptr"), py::arg("draft_probs_ptr"), py::arg("draft_probs_dtype"),
        py::arg("target_logits_ptr"), py::arg("target_logits_dtype"),
        py::arg("temperature_ptr"), py::arg("top_k_ptr"), py::arg("top_p_ptr"),
        py::arg("seeds_ptr"), py::arg("accept_uniforms_ptr"), py::arg("accept_uniforms_dtype"),
        py::arg("race_uniforms_ptr"), py::arg("race_uniforms_dtype"), py::arg("batch"),
        py::arg("num_draft"), py::arg("vocab"), py::arg("lenience_kind"),
        py::arg("lenience_epsilon"), py::arg("output_tokens_ptr"), py::arg("num_accepted_ptr"),
        py::arg("num_threads"));
  m.def("verify_tree", &verify_tree_py,
        "Token-tree verification on contiguous CPU buffers (pointers are addresses, 0 = absent; "
        "dtype codes as verify_chain's). Writes path, output_tokens [B, T], num_accepted and the "
        "depth of each row's deepest valid node [B].",
        py::arg("tree_tokens_ptr"), py::arg("parents_ptr"), py::arg("draft_probs_ptr"),
        py::arg("draft_probs_dtype"), py::arg("target_logits_ptr"),
        py::arg("target_logits_dtype"), py::arg("temperature_ptr"), py::arg("top_k_ptr"),
        py::arg("top_p_ptr"), py::arg("seeds_ptr"), py::arg("batch"), py::arg("num_nodes"),
        py::arg("vocab"), py::arg("path_ptr"),
        py::arg("output_tokens_ptr"), py::arg("num_accepted_ptr"), py::arg("max_depth_ptr"),
        py::arg("num_threads"));
  m.def("philox_uniforms", &philox_uniforms_py,
        "Fill n float32 values u = ((x >> 9) + 0.5) * 2**-23, x = word 0 of Philox4x32-10 at "
        "counter (c0_start + i, c1, c2, 0) keyed by seed, at address out_ptr.",
        py::arg("seed"), py::arg("c0_start"), py::arg("c1"), py::arg("c2"), py::arg("n"),
        py::arg("out_ptr"));
  m.def("skinny_linear_best_isa", [] { return static_cast<int>(draftwise::skinny_linear_best_isa()); },
        "The fastest instruction set of skinny_linear on this CPU: 0 scalar, 1 AVX2+FMA, 2 AVX-512.");
  m.def("skinny_linear", &skinny_linear_py,
        "y[m, n] = sum_k x[m, k] * weight[n, k] (+ bias[n]) on contiguous float32 CPU buffers "
        "(pointers are addresses; bias_ptr 0 = none).",
        py::arg("x_ptr"), py::arg("weight_ptr"), py::arg("bias_ptr"), py::arg("y_ptr"), py::arg("m"),
        py::arg("n"), py::arg("k"), py::arg("isa"), py::arg("num_threads"));
}
