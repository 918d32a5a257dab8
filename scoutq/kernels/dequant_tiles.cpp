/* The many-token path of scoutq's CPU matmuls, registered as scoutq_tiles::dequant_matmul
   (built and loaded by scoutq/kernels/tiles.py).

   y = x @ W^T with W int4 (group-wise) or int8 (per channel) in the compressed-tensors pack
   layout scoutq writes: row-major bytes, element k of a row in byte k * bits / 8 (for 4 bits the
   even element in the low nibble), stored unsigned with offset 2^(bits - 1).

   Why: the packed kernels that are fastest for a few tokens (PyTorch's int4/int8 CPU kernels,
   int4_avx512.cpp) unpack every weight again for every few tokens, so their time grows with the
   token count, and from a few dozen tokens a dense GEMM wins. Here W is dequantized to fp32 a
   tile of rows at a time, into a buffer small enough to stay in cache, and each tile feeds one
   fp32 GEMM over all the tokens (ATen's, i.e. MKL / oneDNN): the dequantization is paid once
   per weight however many tokens there are, and no full-precision copy of W is ever made.
   fp32, not bf16: on CPUs without native bf16 arithmetic a bf16 GEMM runs several times slower
   than fp32 (field-notes F). */

#include <cstdint>
#include <optional>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

namespace {

/* Rows [r0, r1) of W as fp32 into tile [r1 - r0, in]: w = (q - z) * s, z and s per group. */
void dequantize_rows(const uint8_t *packed, const float *scales, const float *zeros, float *tile, int64_t r0,
                     int64_t r1, int64_t in, int64_t group, int64_t bits) {
    const int64_t row_bytes = in * bits / 8, groups = in / group;
    at::parallel_for(r0, r1, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            const uint8_t *row = packed + r * row_bytes;
            float *out = tile + (r - r0) * in;
            for (int64_t g = 0; g < groups; ++g) {
                const float s = scales[r * groups + g];
                const float offset = static_cast<float>(1 << (bits - 1)) + (zeros ? zeros[r * groups + g] : 0.0f);
                const int64_t k0 = g * group;
                if (bits == 4) {
                    const uint8_t *bytes = row + k0 / 2;
                    float *o = out + k0;
                    for (int64_t j = 0; j < group / 2; ++j) {
                        o[2 * j] = (static_cast<float>(bytes[j] & 15) - offset) * s;
                        o[2 * j + 1] = (static_cast<float>(bytes[j] >> 4) - offset) * s;
                    }
                } else {
                    const uint8_t *bytes = row + k0;
                    float *o = out + k0;
                    for (int64_t j = 0; j < group; ++j) o[j] = (static_cast<float>(bytes[j]) - offset) * s;
                }
            }
        }
    });
}

void check(bool ok, const char *what) { TORCH_CHECK(ok, "scoutq_tiles::dequant_matmul: ", what); }

/* x [tokens, in] fp32; packed [out, in * bits / 8] uint8; scales and zeros (zero points as
   floats, optional) [out, in / group] fp32. Returns y [tokens, out] fp32. */
at::Tensor dequant_matmul(const at::Tensor &x, const at::Tensor &packed, const at::Tensor &scales,
                          const std::optional<at::Tensor> &zeros, int64_t bits, int64_t group, int64_t tile_rows) {
    check(bits == 4 || bits == 8, "bits must be 4 or 8");
    check(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "x must be fp32 [tokens, in] on the CPU");
    const int64_t tokens = x.size(0), in = x.size(1), out = packed.size(0);
    check(group > 0 && group % 2 == 0 && in % group == 0, "group must be even and divide in_features");
    check(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
              packed.size(1) == in * bits / 8, "packed must be contiguous uint8 [out, in * bits / 8]");
    check(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.dim() == 2 &&
              scales.size(0) == out && scales.size(1) == in / group, "scales must be contiguous fp32 [out, groups]");
    const bool has_zero = zeros.has_value() && zeros->defined();
    if (has_zero) check(zeros->sizes() == scales.sizes() && zeros->scalar_type() == at::kFloat &&
                        zeros->is_contiguous(), "zeros must be contiguous fp32 [out, groups]");
    check(tile_rows > 0, "tile_rows must be positive");

    const at::Tensor xt = x.t().contiguous();  // [in, tokens]: each tile is one GEMM W_tile @ x^T
    at::Tensor yt = at::empty({out, tokens}, x.options());
    at::Tensor tile = at::empty({std::min(tile_rows, out), in}, x.options());
    for (int64_t r0 = 0; r0 < out; r0 += tile_rows) {
        const int64_t r1 = std::min(out, r0 + tile_rows);
        dequantize_rows(packed.data_ptr<uint8_t>(), scales.data_ptr<float>(),
                        has_zero ? zeros->data_ptr<float>() : nullptr, tile.data_ptr<float>(), r0, r1, in, group, bits);
        at::Tensor rows = yt.narrow(0, r0, r1 - r0);
        at::mm_out(rows, tile.narrow(0, 0, r1 - r0), xt);
    }
    return yt.t().contiguous();
}

}  // namespace

TORCH_LIBRARY(scoutq_tiles, m) {
    m.def("dequant_matmul(Tensor x, Tensor packed, Tensor scales, Tensor? zeros, int bits, int group, "
          "int tile_rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(scoutq_tiles, CPU, m) {
    m.impl("dequant_matmul", &dequant_matmul);
}
