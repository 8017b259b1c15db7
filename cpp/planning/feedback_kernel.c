/* The column loop of error feedback (wqedge/quant/gptq.py, gptq_linears) for a run of columns of one chunk.
 * A planning kernel, not part of the runtime: built into libwqedge_neuqi beside the NeUQI search, loaded through
 * ctypes. The torch loop in gptq.py is the reference (and the path on GPUs, or when this library is missing);
 * a run here does the same float32 operations in the same order per element, so the two agree up to how the
 * rank-1 update rounds (an FMA or not), see tests/test_feedback_kernel.py.
 *
 * Layout: columns are rows (WpT[K][N], in feedback order), so each step reads and writes contiguous memory. */
#include <math.h>
#include <stdint.h>

/* Round columns i0 .. i1-1 (feedback order, all in one chunk and inside the block that ends at b1) onto the
 * chunk's grid and spread each column's error over the block's later columns.
 *   WpT   [K][N]  weights, updated in place (columns i0+1 .. b1-1 receive the errors)
 *   U     [K][K]  upper Cholesky factor of the permuted inverse Hessian (row i: U[i][i+1 ..])
 *   jloc  [i1-i0] chunk-local column of each step (into D and M)
 *   D, M  [N][g]  per row and column: the grid's step and offset (one-scale kinds repeat theirs over g)
 *   hi    [N]     highest code per row (levels - 1); q0 [N] the zero code (1 for ternary, else 0)
 *   QT    [K][N]  dequantized columns (row i written); codes [i1-i0][N] the codes of each step
 *   ErrT  [b1-b0][N] scaled errors (row i - b0 written), for the caller's update of the columns after the block
 * A row's code: q = clamp(round((w - m) / d) + q0, 0, hi) (q0 when d <= 0), its value d (q - q0) + m: the
 * arithmetic of wqedge.quant.affine.grid_codes and dequantize_file. */
void wq_feedback_run(float *WpT, int64_t N, const float *U, int64_t K, int64_t i0, int64_t i1, int64_t b0,
                     int64_t b1, const int32_t *jloc, const float *D, const float *M, int64_t g,
                     const float *hi, const float *q0, const float *udiag, float *QT, uint8_t *codes, float *ErrT)
{
    for (int64_t i = i0; i < i1; i++) {
        float *col = WpT + i * N, *deq = QT + i * N, *err = ErrT + (i - b0) * N;
        uint8_t *qc = codes + (i - i0) * N;
        const int64_t j = jloc[i - i0];
        const float ud = udiag[i];
        for (int64_t r = 0; r < N; r++) {
            const float d = D[r * g + j], m = M[r * g + j], z = q0[r];
            const float safe = d > 0.0f ? d : 1.0f;
            float q = nearbyintf((col[r] - m) / safe) + z;
            q = q < 0.0f ? 0.0f : (q > hi[r] ? hi[r] : q);
            q = d > 0.0f ? q : z;
            const float v = d * (q - z);
            deq[r] = v + m;
            qc[r] = (uint8_t)q;
            err[r] = (col[r] - deq[r]) / ud;
        }
        const float *u = U + i * K;
        for (int64_t k = i + 1; k < b1; k++) {
            float *w = WpT + k * N;
            const float uk = u[k];
            for (int64_t r = 0; r < N; r++) {
                const float p = uk * err[r];
                w[r] = w[r] - p;
            }
        }
    }
}
