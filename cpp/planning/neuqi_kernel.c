/* NeUQI scale/zero-point search for one block of rows (the algorithm of wqedge/quant/neuqi.py, in C for speed).
 * A planning kernel, not part of the runtime: CMake builds it as libwqedge_neuqi (installed next to neuqi.py),
 * which neuqi.py loads through ctypes; the torch version there is the reference and the fallback. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Exact minimum of L(z) = sum h (clamp(round(x+z),0,n-1) - x - z)^2 over z in [zl, zl+2], x = w*inv_s.
   With t = z - zl, v = x + zl + 1/2, f = floor(v): the code steps up at t = tau = f + 1 - v (if 0 <= f <= n-2)
   and at tau + 1 (if -1 <= f <= n-3). L(t) = A2 - 2 t A1 + t^2 H piecewise; a step at time T adds e to A1
   and 2 e T to A2. ev, sv: work arrays of g events; cnt: g + 1 ints. Returns min L and *zbest. */
typedef struct { double t, a, b; } ev_t;

static double exact_window(const double *w, const double *h, int g, int n, double inv_s, double zl,
                           ev_t *ev, ev_t *sv, int *cnt, double *zbest)
{
    double off = zl + 0.5, A1 = 0.0, A2 = 0.0, H = 0.0, top = n - 1, hi1 = n - 2, hi2 = n - 3;
    int ne = 0;
    for (int i = 0; i < g; i++) {
        double hw = h[i];
        double v = w[i] * inv_s + off;
        double f = (double)(int64_t)v;
        f -= (f > v);
        double q0 = f < 0.0 ? 0.0 : (f > top ? top : f);
        double c = q0 - v + 0.5;
        H += hw;
        A1 += hw * c;
        A2 += hw * c * c;
        double a = (f >= 0.0 && f <= hi1) ? hw : 0.0;
        double b = (f >= -1.0 && f <= hi2) ? hw : 0.0;
        double t = f + 1.0 - v;
        ev[ne].t = t < 0.0 ? 0.0 : (t > 1.0 ? 1.0 : t);
        ev[ne].a = a;
        ev[ne].b = b;
        ne += (a != 0.0) | (b != 0.0);
    }
    if (!(H > 0.0)) { *zbest = zl + 1.0; return 0.0; }
    /* bucket sort of the event times (in [0, 1]) into sv: ne buckets, then insertion sort (buckets are in
       order, so only within-bucket inversions remain: expected O(ne) for spread-out times) */
    if (ne > 0) {
        memset(cnt, 0, sizeof(int) * (ne + 1));
        for (int k = 0; k < ne; k++) {
            int bk = (int)(ev[k].t * ne);
            bk = bk >= ne ? ne - 1 : bk;
            cnt[bk + 1]++;
        }
        for (int k = 0; k < ne; k++) cnt[k + 1] += cnt[k];
        for (int k = 0; k < ne; k++) {
            int bk = (int)(ev[k].t * ne);
            bk = bk >= ne ? ne - 1 : bk;
            sv[cnt[bk]++] = ev[k];
        }
        for (int k = 1; k < ne; k++) {
            ev_t x = sv[k];
            int j = k - 1;
            while (j >= 0 && sv[j].t > x.t) { sv[j + 1] = sv[j]; j--; }
            sv[j + 1] = x;
        }
    }
    double invH = 1.0 / H, S1 = A1, S2 = A2, left = 0.0, best = INFINITY, tb = 0.0;
    for (int pass = 0; pass < 2; pass++) {
        for (int k = 0; k < ne; k++) {
            double right = sv[k].t + pass;
            double t = S1 * invH;
            t = t < left ? left : t;
            t = t > right ? right : t;
            double L = S2 + t * (t * H - 2.0 * S1);
            int better = L < best;
            best = better ? L : best;
            tb = better ? t : tb;
            double e = pass ? sv[k].b : sv[k].a;
            S1 += e;
            S2 += 2.0 * e * right;
            left = right;
        }
    }
    {
        double t = S1 * invH;
        t = t < left ? left : t;
        t = t > 2.0 ? 2.0 : t;
        double L = S2 + t * (t * H - 2.0 * S1);
        if (L < best) { best = L; tb = t; }
    }
    *zbest = zl + tb;
    return best < 0.0 ? 0.0 : best;
}

/* Exact minimiser (offset m, w_hat = s q + m) of the convex surrogate: unclamped terms cost s^2/4.
   ws sorted ascending; Hc, Pc, Qc prefix sums (g+1) of h, h*w, h*w^2 in that order. Walks the two sorted
   kink lists (A_j = w_j + s/2: w_j becomes lower-clamped; B_j = w_j - (n - 1/2)s: w_j stops being
   upper-clamped) in merged order until the derivative turns non-negative. *Sv = the surrogate's minimum. */
static double surrogate_value(const double *Hc, const double *Pc, const double *Qc, int g, int a, int b,
                              double m, double s, double k1)
{
    double Hu = Hc[g] - Hc[b], Pu = Pc[g] - Pc[b], Qu = Qc[g] - Qc[b], mu = m + k1;
    double low = Qc[a] - 2.0 * m * Pc[a] + m * m * Hc[a];
    double up = Qu - 2.0 * mu * Pu + mu * mu * Hu;
    double mid = 0.25 * s * s * (Hc[b] - Hc[a]);
    return low + up + mid;
}

static double surrogate_offset(const double *ws, const double *Hc, const double *Pc, const double *Qc, int g,
                               int n, double s, double *Sv)
{
    double H = Hc[g], P = Pc[g], k1 = (n - 1) * s;
    int a = 0, b = 0, ia = 0, ib = 0;
    while (ia < g) {
        double cA = ws[ia] + 0.5 * s;
        double cB = ib < g ? ws[ib] - (n - 0.5) * s : INFINITY;
        double c = cA < cB ? cA : cB;
        double Hu = H - Hc[b], Pu = P - Pc[b], den = Hc[a] + Hu;
        double Gl = c * den - Pc[a] - Pu + k1 * Hu;
        if (Gl > 0.0 && den > 0.0) {
            double root = (Pc[a] + Pu - k1 * Hu) / den;
            root = root < c ? root : c;
            *Sv = surrogate_value(Hc, Pc, Qc, g, a, b, root, s, k1);
            return root;
        }
        if (cB <= cA) { ib++; b = ib; } else { ia++; a = ia; }
        Hu = H - Hc[b]; Pu = P - Pc[b]; den = Hc[a] + Hu;
        if (c * den - Pc[a] - Pu + k1 * Hu >= 0.0) {
            *Sv = surrogate_value(Hc, Pc, Qc, g, a, b, c, s, k1);
            return c;
        }
    }
    *Sv = INFINITY;
    return ws[g - 1] + 0.5 * s;
}

typedef struct { double w, h; } pair_t;
static int cmp_pair(const void *x, const void *y)
{
    double a = ((const pair_t *)x)->w, b = ((const pair_t *)y)->w;
    return (a > b) - (a < b);
}

/* NeUQI for rows [0, R) of W, Hn (float32 [R, g], Hn >= 0 normalised per row). Writes scale, zero. */
int wq_neuqi_rows(const float *W, const float *Hn, int64_t R, int g, int n, int coarse, int fine, int radius,
                  float *s_out, float *z_out)
{
    size_t gd = (size_t)g;
    double *buf = (double *)malloc(sizeof(double) * (8 * gd + 6));
    int *ibuf = (int *)malloc(sizeof(int) * (3 * gd + 2));
    pair_t *pr = (pair_t *)malloc(sizeof(pair_t) * gd);
    if (!buf || !ibuf || !pr) { free(buf); free(ibuf); free(pr); return -1; }
    double *w = buf, *h = w + gd, *ws = h + gd, *Hc = ws + gd, *Pc = Hc + gd + 1, *Qc = Pc + gd + 1;
    ev_t *ev = (ev_t *)malloc(sizeof(ev_t) * 2 * gd), *sv = ev + gd;
    int *cnt = ibuf;
    if (!ev) { free(buf); free(ibuf); free(pr); return -1; }
    for (int64_t r = 0; r < R; r++) {
        const float *wr = W + r * gd, *hr = Hn + r * gd;
        double lo = INFINITY, hi = -INFINITY;
        for (int i = 0; i < g; i++) {
            w[i] = wr[i]; h[i] = hr[i];
            if (h[i] > 0.0) { if (w[i] < lo) lo = w[i]; if (w[i] > hi) hi = w[i]; }
        }
        if (!(lo <= hi)) { lo = hi = 0.0; }
        double smm = (hi - lo) / (n - 1);
        if (!(smm > 0.0)) {
            double cs = lo == 0.0 ? 1.0 : fabs(lo);
            s_out[r] = (float)cs; z_out[r] = (float)(-lo / cs);
            continue;
        }
        for (int i = 0; i < g; i++) { pr[i].w = w[i]; pr[i].h = h[i]; }
        qsort(pr, gd, sizeof(pair_t), cmp_pair);
        Hc[0] = 0.0; Pc[0] = 0.0; Qc[0] = 0.0;
        for (int i = 0; i < g; i++) {
            ws[i] = pr[i].w;
            Hc[i + 1] = Hc[i] + pr[i].h;
            Pc[i + 1] = Pc[i] + pr[i].h * pr[i].w;
            Qc[i + 1] = Qc[i] + pr[i].h * pr[i].w * pr[i].w;
        }
        /* min over scales of s^2 L. A scale is skipped, without changing the result, when a lower bound of
           its loss exceeds the best found: every unclamped term of the true loss is >= 0 where the surrogate
           charges s^2/4, so min_z s^2 L >= S* - (s^2/4) H. The coarse grid runs from the largest scale down
           (the small ones clamp most, and get skipped); ties keep the smaller scale, as an ascending scan would. */
        double best = INFINITY, sb = smm, zb = -lo / smm, H = Hc[g];
        for (int i = coarse; i >= 1; i--) {
            double s = smm * i / coarse, z, Sv;
            double m = surrogate_offset(ws, Hc, Pc, Qc, g, n, s, &Sv);
            if (Sv - 0.25 * s * s * H > best * (1.0 + 1e-9)) continue;
            double L = exact_window(w, h, g, n, 1.0 / s, -m / s - 1.0, ev, sv, cnt, &z) * s * s;
            if (L <= best) { best = L; sb = s; zb = z; }
        }
        double sc = sb;
        for (int j = -radius; j <= radius; j++) {
            if (j == 0) continue;
            double s = sc + smm * j / fine, z, Sv;
            if (!(s > 0.0)) continue;
            double m = surrogate_offset(ws, Hc, Pc, Qc, g, n, s, &Sv);
            if (Sv - 0.25 * s * s * H > best * (1.0 + 1e-9)) continue;
            double L = exact_window(w, h, g, n, 1.0 / s, -m / s - 1.0, ev, sv, cnt, &z) * s * s;
            if (L < best) { best = L; sb = s; zb = z; }
        }
        s_out[r] = (float)sb; z_out[r] = (float)zb;
    }
    free(buf); free(ibuf); free(pr); free(ev);
    return 0;
}

/* One scale of one row, exposed for tests: the surrogate offset *m, then the exact window around it. */
double wq_solve_scale(const float *wf, const float *hf, int g, int n, double s, double *m, double *z)
{
    size_t gd = (size_t)g;
    double *buf = (double *)malloc(sizeof(double) * (6 * gd + 3));
    ev_t *ev = (ev_t *)malloc(sizeof(ev_t) * 2 * gd);
    int *cnt = (int *)malloc(sizeof(int) * (gd + 1));
    pair_t *pr = (pair_t *)malloc(sizeof(pair_t) * gd);
    double *w = buf, *h = w + gd, *ws = h + gd, *Hc = ws + gd, *Pc = Hc + gd + 1, *Qc = Pc + gd + 1, Sv;
    for (int i = 0; i < g; i++) { w[i] = wf[i]; h[i] = hf[i]; pr[i].w = w[i]; pr[i].h = h[i]; }
    qsort(pr, gd, sizeof(pair_t), cmp_pair);
    Hc[0] = 0.0; Pc[0] = 0.0; Qc[0] = 0.0;
    for (int i = 0; i < g; i++) {
        ws[i] = pr[i].w; Hc[i + 1] = Hc[i] + pr[i].h; Pc[i + 1] = Pc[i] + pr[i].h * pr[i].w;
        Qc[i + 1] = Qc[i] + pr[i].h * pr[i].w * pr[i].w;
    }
    *m = surrogate_offset(ws, Hc, Pc, Qc, g, n, s, &Sv);
    double L = exact_window(w, h, g, n, 1.0 / s, -*m / s - 1.0, ev, ev + gd, cnt, z);
    free(buf); free(ev); free(cnt); free(pr);
    return L;
}
