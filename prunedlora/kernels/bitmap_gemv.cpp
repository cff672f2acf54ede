// Fused bitmap GEMV/GEMM and decode for prunedlora's bitmap form (prunedlora/pruning/bitmap.py).
//
// Layout of one (d_out, d_in) matrix: per row ceil(d_in / 8) mask bytes (bit k of byte b <-> column 8b + k,
// LSB first), the row's kept values packed in column order, and int64 row offsets into the packed values.
// On a little-endian CPU two consecutive mask bytes are the 16-bit mask of 16 columns, so AVX-512 reads one
// uint16 per 16 columns and AVX2 one byte per 8 columns, with no change to the stored form.
//
// Per chunk of columns: load the next values (contiguous), expand them to their columns in a register
// (AVX-512: vexpandps; AVX2: vpermps with a 256-entry index table), FMA with the input, and advance the
// values pointer by popcount(mask). bfloat16 values are widened to float32 in registers; sums are float32.
// The vector loads may read up to 16 values past a row's end, so rows within 16 values of the end of the
// buffer, and the last d_in % 16 (d_in % 8) columns of every row, run the scalar code.
//
// The library is plain C (no torch headers: it builds in seconds); the Python side passes data pointers.
// Rows run under OpenMP with the thread count the caller passes (torch.get_num_threads()).

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace {

using bf16_t = uint16_t;

enum Isa { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3 };
constexpr int kTokenBlock = 4;  // tokens sharing one expand of the weights (accumulators stay in registers)
constexpr int64_t kValuesPerThread = 1 << 14;  // below this much work per thread, waking threads costs more
// Software prefetch distance along the values stream: the hardware prefetcher alone left the AVX-512 path at
// ~85% of its cold-memory speed. Prefetches never fault, so running past the buffer's end is harmless.
constexpr int64_t kPrefetchBytes = 4096;

inline void prefetch_ahead(const void* values, const uint8_t* mask) {
  _mm_prefetch(static_cast<const char*>(values) + kPrefetchBytes, _MM_HINT_T0);
  _mm_prefetch(static_cast<const char*>(values) + kPrefetchBytes + 64, _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(mask) + kPrefetchBytes / 8, _MM_HINT_T0);
}

struct Matrix {
  const uint8_t* mask;
  const void* values;
  const int64_t* offsets;
  int64_t nnz, d_out, d_in, nb;
};

inline float to_float(float v) { return v; }
inline float to_float(bf16_t v) {
  const uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename V>
const V* row_values(const Matrix& m, int64_t i) {
  return static_cast<const V*>(m.values) + m.offsets[i];
}

// ------------------------------------------------------------------------------------------- scalar
// Adds columns [col0, d_in) of row i times nt tokens of x (row stride d_in) into acc; vp is the row's first
// value at column col0 (col0 a multiple of 8). Bits past d_in (zero in a well-formed mask) are ignored.
template <typename V>
void row_scalar(const Matrix& m, int64_t i, int64_t col0, const V* vp, const float* x, int64_t nt, float* acc) {
  const uint8_t* mrow = m.mask + i * m.nb;
  for (int64_t b = col0 / 8; b < m.nb; ++b) {
    for (unsigned bits = mrow[b]; bits; bits &= bits - 1) {
      const int64_t col = 8 * b + __builtin_ctz(bits);
      if (col >= m.d_in) break;
      const float w = to_float(*vp++);
      for (int64_t t = 0; t < nt; ++t) acc[t] += w * x[t * m.d_in + col];
    }
  }
}

template <typename V>
void decode_scalar(const Matrix& m, int64_t i, int64_t col0, const V* vp, V* out) {
  const uint8_t* mrow = m.mask + i * m.nb;
  std::memset(out + col0, 0, sizeof(V) * (m.d_in - col0));
  for (int64_t b = col0 / 8; b < m.nb; ++b) {
    for (unsigned bits = mrow[b]; bits; bits &= bits - 1) {
      const int64_t col = 8 * b + __builtin_ctz(bits);
      if (col >= m.d_in) break;
      out[col] = *vp++;
    }
  }
}

struct Scalar {
  static constexpr int64_t kWidth = 8;
  template <typename V, int TB>
  static void row(const Matrix& m, int64_t i, const float* x, float* out) {
    for (int t = 0; t < TB; ++t) out[t] = 0.f;
    row_scalar<V>(m, i, 0, row_values<V>(m, i), x, TB, out);
  }
  template <typename V>
  static void rows4(const Matrix& m, int64_t i, const float* x, float* out) {
    for (int r = 0; r < 4; ++r) row<V, 1>(m, i + r, x, out + r);
  }
  template <typename V>
  static void decode_row(const Matrix& m, int64_t i, V* out) { decode_scalar<V>(m, i, 0, row_values<V>(m, i), out); }
};

// ------------------------------------------------------------------------------------------ AVX-512
#define PL_AVX512 __attribute__((target("avx512f,avx2,fma,popcnt,bmi")))

PL_AVX512 inline __m512 expand16(unsigned bits, const float* vp) {
  return _mm512_maskz_expand_ps(__mmask16(bits), _mm512_loadu_ps(vp));
}
PL_AVX512 inline __m512 expand16(unsigned bits, const bf16_t* vp) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vp)));
  return _mm512_maskz_expand_ps(__mmask16(bits), _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)));
}
PL_AVX512 inline void store16(unsigned bits, const float* vp, float* out) {
  _mm512_storeu_ps(out, _mm512_maskz_expand_ps(__mmask16(bits), _mm512_loadu_ps(vp)));
}
PL_AVX512 inline void store16(unsigned bits, const bf16_t* vp, bf16_t* out) {
  // Expanded as 32-bit integers and narrowed back: the bf16 bit patterns pass through unchanged.
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vp)));
  const __m256i packed = _mm512_cvtepi32_epi16(_mm512_maskz_expand_epi32(__mmask16(bits), wide));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), packed);
}

struct Avx512 {
  static constexpr int64_t kWidth = 16;
  // Four chunks (64 columns) per step: one 64-bit mask read gives every chunk's value offset at once, so the
  // popcount -> pointer chain is paid once per 64 columns, and four accumulators per token hide FMA latency.
  template <typename V, int TB>
  PL_AVX512 static void row(const Matrix& m, int64_t i, const float* x, float* out) {
    const uint8_t* mrow = m.mask + i * m.nb;
    const V* vp = row_values<V>(m, i);
    const int64_t full = m.d_in / 16;
    __m512 acc[TB][4];
    for (int t = 0; t < TB; ++t)
      for (int u = 0; u < 4; ++u) acc[t][u] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 4 <= full; k += 4) {
      uint64_t bits;
      std::memcpy(&bits, mrow + 2 * k, 8);
      prefetch_ahead(vp, mrow + 2 * k);
      const __m512 w[4] = {expand16(bits & 0xFFFF, vp), expand16((bits >> 16) & 0xFFFF, vp + _mm_popcnt_u64(bits & 0xFFFF)),
                           expand16((bits >> 32) & 0xFFFF, vp + _mm_popcnt_u64(bits & 0xFFFFFFFFull)),
                           expand16(bits >> 48, vp + _mm_popcnt_u64(bits & 0xFFFFFFFFFFFFull))};
      vp += _mm_popcnt_u64(bits);
      for (int t = 0; t < TB; ++t)
        for (int u = 0; u < 4; ++u)
          acc[t][u] = _mm512_fmadd_ps(w[u], _mm512_loadu_ps(x + t * m.d_in + 16 * (k + u)), acc[t][u]);
    }
    for (; k < full; ++k) {
      uint16_t bits;
      std::memcpy(&bits, mrow + 2 * k, 2);
      const __m512 w = expand16(bits, vp);
      vp += _mm_popcnt_u32(bits);
      for (int t = 0; t < TB; ++t) acc[t][0] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + t * m.d_in + 16 * k), acc[t][0]);
    }
    float tail[TB] = {};
    row_scalar<V>(m, i, 16 * full, vp, x, TB, tail);
    for (int t = 0; t < TB; ++t) {
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]), _mm512_add_ps(acc[t][2], acc[t][3]));
      out[t] = _mm512_reduce_add_ps(sum) + tail[t];
    }
  }
  // One token, four rows at once: each input chunk is loaded once for four rows, and four independent value
  // streams keep more memory reads in flight than one (one row at a time left a single core well below the
  // bandwidth the dense GEMV reaches with float32 values).
  template <typename V>
  PL_AVX512 static void rows4(const Matrix& m, int64_t i, const float* x, float* out) {
    const uint8_t* mrow[4];
    const V* vp[4];
    __m512 acc[4][2];
    for (int r = 0; r < 4; ++r) {
      mrow[r] = m.mask + (i + r) * m.nb;
      vp[r] = row_values<V>(m, i + r);
      acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    }
    const int64_t full = m.d_in / 16;
    int64_t k = 0;
    for (; k + 4 <= full; k += 4) {
      const __m512 xv[4] = {_mm512_loadu_ps(x + 16 * k), _mm512_loadu_ps(x + 16 * k + 16),
                            _mm512_loadu_ps(x + 16 * k + 32), _mm512_loadu_ps(x + 16 * k + 48)};
      for (int r = 0; r < 4; ++r) {
        uint64_t bits;
        std::memcpy(&bits, mrow[r] + 2 * k, 8);
        prefetch_ahead(vp[r], mrow[r] + 2 * k);
        const V* p = vp[r];
        acc[r][0] = _mm512_fmadd_ps(expand16(bits & 0xFFFF, p), xv[0], acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(expand16((bits >> 16) & 0xFFFF, p + _mm_popcnt_u64(bits & 0xFFFF)), xv[1],
                                    acc[r][1]);
        acc[r][0] = _mm512_fmadd_ps(expand16((bits >> 32) & 0xFFFF, p + _mm_popcnt_u64(bits & 0xFFFFFFFFull)),
                                    xv[2], acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(expand16(bits >> 48, p + _mm_popcnt_u64(bits & 0xFFFFFFFFFFFFull)), xv[3],
                                    acc[r][1]);
        vp[r] += _mm_popcnt_u64(bits);
      }
    }
    for (; k < full; ++k) {
      const __m512 xv = _mm512_loadu_ps(x + 16 * k);
      for (int r = 0; r < 4; ++r) {
        uint16_t bits;
        std::memcpy(&bits, mrow[r] + 2 * k, 2);
        acc[r][0] = _mm512_fmadd_ps(expand16(bits, vp[r]), xv, acc[r][0]);
        vp[r] += _mm_popcnt_u32(bits);
      }
    }
    for (int r = 0; r < 4; ++r) {
      float tail = 0.f;
      row_scalar<V>(m, i + r, 16 * full, vp[r], x, 1, &tail);
      out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1])) + tail;
    }
  }
  template <typename V>
  PL_AVX512 static void decode_row(const Matrix& m, int64_t i, V* out) {
    const uint8_t* mrow = m.mask + i * m.nb;
    const V* vp = row_values<V>(m, i);
    const int64_t full = m.d_in / 16;
    for (int64_t k = 0; k < full; ++k) {
      uint16_t bits;
      std::memcpy(&bits, mrow + 2 * k, 2);
      store16(bits, vp, out + 16 * k);
      vp += _mm_popcnt_u32(bits);
    }
    decode_scalar<V>(m, i, 16 * full, vp, out);
  }
};

// --------------------------------------------------------------------------------------------- AVX2
#define PL_AVX2 __attribute__((target("avx2,fma,popcnt,bmi")))

// kExpand[m][lane]: the index of the packed value that lands in `lane` for mask byte m (its rank among the
// set bits), with the sign bit set on present lanes; vpermps reads only the low 3 bits, and an arithmetic
// shift of the entry gives the lane mask that zeroes absent lanes.
struct ExpandTable {
  alignas(32) int32_t idx[256][8];
  ExpandTable() {
    for (int m = 0; m < 256; ++m) {
      int rank = 0;
      for (int lane = 0; lane < 8; ++lane) idx[m][lane] = (m >> lane) & 1 ? int32_t(0x80000000u | rank++) : 0;
    }
  }
};
const ExpandTable kExpand;

PL_AVX2 inline __m256i expand8_bits(unsigned bits, __m256i packed) {
  const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.idx[bits]));
  return _mm256_and_si256(_mm256_permutevar8x32_epi32(packed, idx), _mm256_srai_epi32(idx, 31));
}
PL_AVX2 inline __m256 expand8(unsigned bits, const float* vp) {
  return _mm256_castsi256_ps(expand8_bits(bits, _mm256_castps_si256(_mm256_loadu_ps(vp))));
}
PL_AVX2 inline __m256 expand8(unsigned bits, const bf16_t* vp) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vp)));
  return _mm256_castsi256_ps(expand8_bits(bits, _mm256_slli_epi32(wide, 16)));
}
PL_AVX2 inline void store8(unsigned bits, const float* vp, float* out) { _mm256_storeu_ps(out, expand8(bits, vp)); }
PL_AVX2 inline void store8(unsigned bits, const bf16_t* vp, bf16_t* out) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vp)));
  const __m256i lanes = expand8_bits(bits, wide);  // 8 x 32-bit, each < 2^16
  // packus works per 128-bit half: [0..3, 0..3 | 4..7, 4..7]; the permute gathers 0..7 in the low half.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(lanes, lanes), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(packed));
}

struct Avx2 {
  static constexpr int64_t kWidth = 8;
  // As Avx512::row, four 8-column chunks per step (one 32-bit mask read); 16 ymm registers hold 4 / TB
  // accumulators per token.
  template <typename V, int TB>
  PL_AVX2 static void row(const Matrix& m, int64_t i, const float* x, float* out) {
    constexpr int U = TB == 1 ? 4 : TB == 2 ? 2 : 1;
    const uint8_t* mrow = m.mask + i * m.nb;
    const V* vp = row_values<V>(m, i);
    const int64_t full = m.d_in / 8;
    __m256 acc[TB][U];
    for (int t = 0; t < TB; ++t)
      for (int u = 0; u < U; ++u) acc[t][u] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 4 <= full; k += 4) {
      uint32_t bits;
      std::memcpy(&bits, mrow + k, 4);
      prefetch_ahead(vp, mrow + k);
      const __m256 w[4] = {expand8(bits & 0xFF, vp), expand8((bits >> 8) & 0xFF, vp + _mm_popcnt_u32(bits & 0xFF)),
                           expand8((bits >> 16) & 0xFF, vp + _mm_popcnt_u32(bits & 0xFFFF)),
                           expand8(bits >> 24, vp + _mm_popcnt_u32(bits & 0xFFFFFF))};
      vp += _mm_popcnt_u32(bits);
      for (int t = 0; t < TB; ++t)
        for (int u = 0; u < 4; ++u)
          acc[t][u % U] = _mm256_fmadd_ps(w[u], _mm256_loadu_ps(x + t * m.d_in + 8 * (k + u)), acc[t][u % U]);
    }
    for (; k < full; ++k) {
      const unsigned bits = mrow[k];
      const __m256 w = expand8(bits, vp);
      vp += _mm_popcnt_u32(bits);
      for (int t = 0; t < TB; ++t) acc[t][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + t * m.d_in + 8 * k), acc[t][0]);
    }
    float tail[TB] = {};
    row_scalar<V>(m, i, 8 * full, vp, x, TB, tail);
    for (int t = 0; t < TB; ++t) {
      __m256 sum = acc[t][0];
      for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[t][u]);
      const __m128 half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
      const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
      out[t] = _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair))) + tail[t];
    }
  }
  // As Avx512::rows4, with one accumulator per row (16 ymm registers).
  template <typename V>
  PL_AVX2 static void rows4(const Matrix& m, int64_t i, const float* x, float* out) {
    const uint8_t* mrow[4];
    const V* vp[4];
    __m256 acc[4];
    for (int r = 0; r < 4; ++r) {
      mrow[r] = m.mask + (i + r) * m.nb;
      vp[r] = row_values<V>(m, i + r);
      acc[r] = _mm256_setzero_ps();
    }
    const int64_t full = m.d_in / 8;
    int64_t k = 0;
    for (; k + 4 <= full; k += 4) {
      const __m256 xv[4] = {_mm256_loadu_ps(x + 8 * k), _mm256_loadu_ps(x + 8 * k + 8),
                            _mm256_loadu_ps(x + 8 * k + 16), _mm256_loadu_ps(x + 8 * k + 24)};
      for (int r = 0; r < 4; ++r) {
        uint32_t bits;
        std::memcpy(&bits, mrow[r] + k, 4);
        prefetch_ahead(vp[r], mrow[r] + k);
        const V* p = vp[r];
        acc[r] = _mm256_fmadd_ps(expand8(bits & 0xFF, p), xv[0], acc[r]);
        acc[r] = _mm256_fmadd_ps(expand8((bits >> 8) & 0xFF, p + _mm_popcnt_u32(bits & 0xFF)), xv[1], acc[r]);
        acc[r] = _mm256_fmadd_ps(expand8((bits >> 16) & 0xFF, p + _mm_popcnt_u32(bits & 0xFFFF)), xv[2], acc[r]);
        acc[r] = _mm256_fmadd_ps(expand8(bits >> 24, p + _mm_popcnt_u32(bits & 0xFFFFFF)), xv[3], acc[r]);
        vp[r] += _mm_popcnt_u32(bits);
      }
    }
    for (; k < full; ++k) {
      const __m256 xv = _mm256_loadu_ps(x + 8 * k);
      for (int r = 0; r < 4; ++r) {
        acc[r] = _mm256_fmadd_ps(expand8(mrow[r][k], vp[r]), xv, acc[r]);
        vp[r] += _mm_popcnt_u32(mrow[r][k]);
      }
    }
    for (int r = 0; r < 4; ++r) {
      float tail = 0.f;
      row_scalar<V>(m, i + r, 8 * full, vp[r], x, 1, &tail);
      const __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
      const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
      out[r] = _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair))) + tail;
    }
  }
  template <typename V>
  PL_AVX2 static void decode_row(const Matrix& m, int64_t i, V* out) {
    const uint8_t* mrow = m.mask + i * m.nb;
    const V* vp = row_values<V>(m, i);
    const int64_t full = m.d_in / 8;
    for (int64_t k = 0; k < full; ++k) {
      store8(mrow[k], vp, out + 8 * k);
      vp += _mm_popcnt_u32(mrow[k]);
    }
    decode_scalar<V>(m, i, 8 * full, vp, out);
  }
};

// ------------------------------------------------------------------------------------------- drivers
int clamp_threads(int nthreads, int64_t work) {
  return int(std::max<int64_t>(1, std::min<int64_t>(nthreads, work / kValuesPerThread)));
}

// A row's vector loads stay inside the values buffer when 16 values past its end are still inside it.
inline bool vector_safe(const Matrix& m, int64_t i) { return m.offsets[i + 1] + 16 <= m.nnz; }

// One token, float32 values: rows in groups of four (the last group, and groups near the end of the values
// buffer, row by row).
template <typename K, typename V>
void gemv(const Matrix& m, const float* x, float* y, int nthreads) {
  const int64_t groups = (m.d_out + 3) / 4;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t i = 4 * g;
    if (i + 4 <= m.d_out && vector_safe(m, i + 3)) {  // offsets grow, so row i + 3 safe means all four are
      K::template rows4<V>(m, i, x, y + i);
      continue;
    }
    for (int64_t r = i; r < std::min(i + 4, m.d_out); ++r) {
      float out = 0.f;
      if (vector_safe(m, r)) {
        K::template row<V, 1>(m, r, x, &out);
      } else {
        row_scalar<V>(m, r, 0, row_values<V>(m, r), x, 1, &out);
      }
      y[r] = out;
    }
  }
}

template <typename K, typename V>
void gemm(const Matrix& m, const float* x, int64_t n_tokens, float* y, int nthreads) {
  // Four rows at once pays for float32 values (more reads in flight: 1.2-1.35x at 7B shapes from memory) and
  // costs for bfloat16 (half the bytes; the widening adds work per chunk: 0.8-0.95x), both measured.
  if (n_tokens == 1 && std::is_same_v<V, float>) return gemv<K, V>(m, x, y, nthreads);
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t i = 0; i < m.d_out; ++i) {
    const bool safe = vector_safe(m, i);
    for (int64_t t0 = 0; t0 < n_tokens; t0 += kTokenBlock) {
      const int64_t nt = std::min<int64_t>(kTokenBlock, n_tokens - t0);
      const float* xb = x + t0 * m.d_in;
      float out[kTokenBlock] = {};
      if (!safe) {
        row_scalar<V>(m, i, 0, row_values<V>(m, i), xb, nt, out);
      } else if (nt == 4) {
        K::template row<V, 4>(m, i, xb, out);
      } else if (nt == 3) {
        K::template row<V, 3>(m, i, xb, out);
      } else if (nt == 2) {
        K::template row<V, 2>(m, i, xb, out);
      } else {
        K::template row<V, 1>(m, i, xb, out);
      }
      for (int64_t t = 0; t < nt; ++t) y[(t0 + t) * m.d_out + i] = out[t];
    }
  }
}

template <typename K, typename V>
void decode(const Matrix& m, V* out, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t i = 0; i < m.d_out; ++i) {
    if (vector_safe(m, i)) {
      K::template decode_row<V>(m, i, out + i * m.d_in);
    } else {
      decode_scalar<V>(m, i, 0, row_values<V>(m, i), out + i * m.d_in);
    }
  }
}

bool isa_supported(int isa) {
  __builtin_cpu_init();
  switch (isa) {
    case kScalar:
      return true;
    case kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt");
    case kAvx512:
      return __builtin_cpu_supports("avx512f") && isa_supported(kAvx2);
    default:
      return false;
  }
}

int resolve(int isa) {
  if (isa == kAuto) return isa_supported(kAvx512) ? kAvx512 : isa_supported(kAvx2) ? kAvx2 : kScalar;
  return isa_supported(isa) ? isa : -1;
}

template <typename V>
int gemm_isa(int isa, const Matrix& m, const float* x, int64_t n_tokens, float* y, int nthreads) {
  switch (resolve(isa)) {
    case kAvx512: gemm<Avx512, V>(m, x, n_tokens, y, nthreads); return kAvx512;
    case kAvx2: gemm<Avx2, V>(m, x, n_tokens, y, nthreads); return kAvx2;
    case kScalar: gemm<Scalar, V>(m, x, n_tokens, y, nthreads); return kScalar;
    default: return -1;
  }
}

template <typename V>
int decode_isa(int isa, const Matrix& m, V* out, int nthreads) {
  switch (resolve(isa)) {
    case kAvx512: decode<Avx512, V>(m, out, nthreads); return kAvx512;
    case kAvx2: decode<Avx2, V>(m, out, nthreads); return kAvx2;
    case kScalar: decode<Scalar, V>(m, out, nthreads); return kScalar;
    default: return -1;
  }
}

}  // namespace

extern "C" {

// The ISA `isa` resolves to on this CPU (0 = best available), or -1 when the CPU lacks it.
int pl_bitmap_resolve_isa(int isa) { return resolve(isa); }

// y (n_tokens, d_out) float32 = x (n_tokens, d_in) float32 @ W^T for W in bitmap form with float32
// (bf16 = 0) or bfloat16 (bf16 = 1) values. Returns the ISA used, or -1 when `isa` is not available.
int pl_bitmap_gemm(const uint8_t* mask, const void* values, const int64_t* offsets, int64_t nnz, int64_t d_out,
                   int64_t d_in, int bf16, const float* x, int64_t n_tokens, float* y, int isa, int nthreads) {
  const Matrix m{mask, values, offsets, nnz, d_out, d_in, (d_in + 7) / 8};
  nthreads = clamp_threads(nthreads, std::max<int64_t>(nnz, d_out) * n_tokens);
  return bf16 ? gemm_isa<bf16_t>(isa, m, x, n_tokens, y, nthreads)
              : gemm_isa<float>(isa, m, x, n_tokens, y, nthreads);
}

// out (d_out, d_in), the values' dtype = the dense matrix, bit for bit. Returns the ISA used or -1.
int pl_bitmap_decode(const uint8_t* mask, const void* values, const int64_t* offsets, int64_t nnz, int64_t d_out,
                     int64_t d_in, int bf16, void* out, int isa, int nthreads) {
  const Matrix m{mask, values, offsets, nnz, d_out, d_in, (d_in + 7) / 8};
  nthreads = clamp_threads(nthreads, d_out * d_in);
  return bf16 ? decode_isa<bf16_t>(isa, m, static_cast<bf16_t*>(out), nthreads)
              : decode_isa<float>(isa, m, static_cast<float*>(out), nthreads);
}

}  // extern "C"
