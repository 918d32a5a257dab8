/* scoutq's int4 dequant-matmul for x86 CPUs with AVX-512 BF16 (Zen 4, Sapphire Rapids and later),
   registered as the torch op scoutq::int4_matmul (built and loaded by scoutq/kernels/native.py).

   y[t, o] = sum_k x[t, k] * (q[o, k] - z[o, g]) * s[o, g],   g = k / group

   Weights stay 4-bit in memory and are widened in registers: 64 weights (32 bytes) at a time
   are split into two vectors of 32 nibbles u = q + 8, and each is made a bf16 value with one
   OR: the bits 0x4300 | u are the bf16 of 128 + u exactly (bf16's 7-bit mantissa counts in
   units of 1 between 128 and 256). vdpbf16ps multiplies them with bf16 activations,
   accumulating in fp32. Since (q - z) = (128 + u) - (136 + z), each group's sum is corrected
   by s * (136 + z) * sum(x over the group); products of bf16 values are exact in fp32, so the
   offset costs only fp32 rounding of the larger partial sums.
   Rows are split over OpenMP threads and read front to back, one at a time (a single stream
   per thread is what the hardware prefetcher follows best: interleaving 16 rows to keep the
   activations in L1 measured slower at one token). Tokens are processed in tiles of TILE so
   each unpacked weight vector is reused for every token of the tile, and the accumulators
   stay in registers.

   Packed layout (made by scoutq/kernels/native.py): row-major [out, in / 2] bytes; within
   each run of 64 inputs starting at k, byte j holds u[k + j] in its low nibble and
   u[k + 32 + j] in its high nibble. */

#include <immintrin.h>

#include <cstdint>
#include <optional>

/* The narrow ATen headers, not torch/extension.h: they are all the op needs and compile in a
   fraction of the time (the build runs on the user's first use). */
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace {

constexpr int TILE = 8;           /* tokens per register tile */
constexpr int64_t CHUNK = 64;     /* inputs per packed run */
constexpr float OFFSET = 136.0f;  /* 128 from the bf16 trick, 8 from the unsigned nibble */

bool cpu_supported() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512bf16");
}

inline __attribute__((always_inline)) void row_tile(
    const uint8_t *row, const float *scale_row, const float *zero_scale_row, const uint16_t *x,
    const float *x_group_sums, float *y, int64_t out, int64_t in, int64_t group, int64_t o, int tokens) {
    const __m512i low_mask = _mm512_set1_epi16(0x0F);
    const __m512i exponent = _mm512_set1_epi16(0x4300); /* bf16 128.0 */
    const int64_t groups = in / group;
    __m512 total[TILE];
    float correction[TILE];
    for (int t = 0; t < tokens; t++) {
        total[t] = _mm512_setzero_ps();
        correction[t] = 0.0f;
    }
    for (int64_t g = 0; g < groups; g++) {
        /* two accumulators per token (low and high nibbles): independent dependency chains */
        __m512 acc_low[TILE], acc_high[TILE];
        for (int t = 0; t < tokens; t++) acc_low[t] = acc_high[t] = _mm512_setzero_ps();
        for (int64_t k = g * group; k < (g + 1) * group; k += 64) {
            __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(row + k / 2)));
            /* (bytes & 0x0F) | 0x4300 in one ternary-logic op: A | (B & C) is 0xF8 */
            __m512i low = _mm512_ternarylogic_epi32(exponent, bytes, low_mask, 0xF8);
            __m512i high = _mm512_or_si512(_mm512_srli_epi16(bytes, 4), exponent);
            for (int t = 0; t < tokens; t++) {
                const uint16_t *xt = x + (int64_t)t * in + k;
                acc_low[t] = _mm512_dpbf16_ps(acc_low[t], (__m512bh)low, (__m512bh)_mm512_loadu_si512(xt));
                acc_high[t] = _mm512_dpbf16_ps(acc_high[t], (__m512bh)high, (__m512bh)_mm512_loadu_si512(xt + 32));
            }
        }
        const __m512 scale = _mm512_set1_ps(scale_row[g]);
        for (int t = 0; t < tokens; t++)
            total[t] = _mm512_fmadd_ps(_mm512_add_ps(acc_low[t], acc_high[t]), scale, total[t]);
        /* (q - z) = (128 + u) - (136 + z): subtract s * (136 + z) * sum(x) over the group */
        const float offset = scale_row[g] * OFFSET + (zero_scale_row ? zero_scale_row[g] : 0.0f);
        for (int t = 0; t < tokens; t++) correction[t] += offset * x_group_sums[t * groups + g];
    }
    for (int t = 0; t < tokens; t++) y[(int64_t)t * out + o] = _mm512_reduce_add_ps(total[t]) - correction[t];
}

/* x: [tokens, in] bf16 bits; scales, zero_scales (z * s, or null): [out, in / group] fp32;
   x_group_sums: [tokens, in / group] fp32, sums of the bf16 activations; y: [tokens, out].
   in and group must be multiples of 64, group must divide in. */
void int4_matmul_raw(const uint8_t *packed, const float *scales, const float *zero_scales, const uint16_t *x,
                     const float *x_group_sums, float *y, int64_t tokens, int64_t out, int64_t in, int64_t group,
                     int threads) {
    const int64_t groups = in / group;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < out; o++) {
        const uint8_t *row = packed + o * (in / 2);
        const float *scale_row = scales + o * groups;
        const float *zero_row = zero_scales ? zero_scales + o * groups : nullptr;
        for (int64_t t0 = 0; t0 < tokens; t0 += TILE) {
            const int tile = (int)(tokens - t0 < TILE ? tokens - t0 : TILE);
            const uint16_t *xt = x + t0 * in;
            const float *sums = x_group_sums + t0 * groups;
            float *yt = y + t0 * out;
            /* constant tile sizes let the compiler keep every accumulator in a register */
            switch (tile) {
            case 1: row_tile(row, scale_row, zero_row, xt, sums, yt, out, in, group, o, 1); break;
            case 4: row_tile(row, scale_row, zero_row, xt, sums, yt, out, in, group, o, 4); break;
            case 8: row_tile(row, scale_row, zero_row, xt, sums, yt, out, in, group, o, 8); break;
            default: row_tile(row, scale_row, zero_row, xt, sums, yt, out, in, group, o, tile);
            }
        }
    }
}

void check_matrix(const at::Tensor &t, const char *name, at::ScalarType dtype, int64_t rows, int64_t cols) {
    TORCH_CHECK(t.device().is_cpu(), "scoutq::int4_matmul: ", name, " must be on the CPU, got ", t.device());
    TORCH_CHECK(t.scalar_type() == dtype, "scoutq::int4_matmul: ", name, " must be ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "scoutq::int4_matmul: ", name,
                " must have shape [", rows, ", ", cols, "], got ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), "scoutq::int4_matmul: ", name, " must be contiguous");
}

/* x [tokens, in] bf16; packed [out, in / 2] uint8 (native.pack_int4's layout); scales and
   zero_scales (z * s, optional) [out, in / group_size] fp32. Returns y [tokens, out] fp32. */
at::Tensor int4_matmul(const at::Tensor &x, const at::Tensor &packed, const at::Tensor &scales,
                       const std::optional<at::Tensor> &zero_scales, int64_t group_size) {
    TORCH_CHECK(x.dim() == 2, "scoutq::int4_matmul: x must be [tokens, in], got ", x.sizes());
    TORCH_CHECK(packed.dim() == 2, "scoutq::int4_matmul: packed must be [out, in / 2], got ", packed.sizes());
    const int64_t tokens = x.size(0), in = x.size(1), out = packed.size(0);
    TORCH_CHECK(in % CHUNK == 0, "scoutq::int4_matmul: in_features must be a multiple of 64, got ", in);
    TORCH_CHECK(group_size > 0 && group_size % CHUNK == 0 && in % group_size == 0,
                "scoutq::int4_matmul: group_size must be a multiple of 64 that divides in_features (", in,
                "), got ", group_size);
    const int64_t groups = in / group_size;
    check_matrix(x, "x", at::kBFloat16, tokens, in);
    check_matrix(packed, "packed", at::kByte, out, in / 2);
    check_matrix(scales, "scales", at::kFloat, out, groups);
    const bool has_zero = zero_scales.has_value() && zero_scales->defined();
    if (has_zero) check_matrix(*zero_scales, "zero_scales", at::kFloat, out, groups);

    /* Last, so the argument checks can be tested anywhere the library loads: without this check
       a CPU without AVX-512 BF16 would die on an illegal instruction rather than raise. */
    static const bool supported = cpu_supported();
    TORCH_CHECK(supported, "scoutq::int4_matmul: this CPU lacks AVX-512 BF16");

    /* The per-group offset correction needs the sums of the bf16 activations the kernel reads. */
    const at::Tensor sums = x.to(at::kFloat).view({tokens, groups, group_size}).sum(-1).contiguous();
    at::Tensor y = at::empty({tokens, out}, x.options().dtype(at::kFloat));
    int4_matmul_raw(packed.data_ptr<uint8_t>(), scales.data_ptr<float>(),
                    has_zero ? zero_scales->data_ptr<float>() : nullptr,
                    reinterpret_cast<const uint16_t *>(x.data_ptr<at::BFloat16>()), sums.data_ptr<float>(),
                    y.data_ptr<float>(), tokens, out, in, group_size, at::get_num_threads());
    return y;
}

}  // namespace

TORCH_LIBRARY(scoutq, m) {
    m.def("int4_matmul(Tensor x, Tensor packed, Tensor scales, Tensor? zero_scales, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(scoutq, CPU, m) {
    m.impl("int4_matmul", &int4_matmul);
}
