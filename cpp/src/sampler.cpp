#include "sampler.h"

#include <algorithm>
#include <cmath>

namespace wqe {

Sampler::Sampler(const wqe_sampler_params& p) : p_(p), state_(p.seed ^ 0x9E3779B97F4A7C15ull) {}

double Sampler::uniform() {
    // splitmix64
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (double)(z >> 11) * (1.0 / 9007199254740992.0);
}

int32_t Sampler::sample(const float* logits, int32_t n) {
    if (!(p_.temperature > 0.0f)) {
        int32_t best = 0;
        for (int32_t i = 1; i < n; ++i)
            if (logits[i] > logits[best]) best = i;
        return best;
    }
    buf_.resize(n);
    for (int32_t i = 0; i < n; ++i) buf_[i] = {logits[i], i};
    // Highest logits first (ties by id, for determinism).
    auto cmp = [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
    };
    int32_t k = n;
    if (p_.top_k > 0 && p_.top_k < n) {
        k = p_.top_k;
        std::partial_sort(buf_.begin(), buf_.begin() + k, buf_.end(), cmp);
    } else {
        std::sort(buf_.begin(), buf_.end(), cmp);
    }
    const double mx = buf_[0].first;
    std::vector<double> prob(k);
    double total = 0.0;
    for (int32_t i = 0; i < k; ++i) {
        prob[i] = std::exp(((double)buf_[i].first - mx) / p_.temperature);
        total += prob[i];
    }
    int32_t keep = k;
    if (p_.top_p > 0.0f && p_.top_p < 1.0f) {
        double cum = 0.0;
        for (int32_t i = 0; i < k; ++i) {
            cum += prob[i] / total;
            if (cum >= p_.top_p) {
                keep = i + 1;
                break;
            }
        }
    }
    double mass = 0.0;
    for (int32_t i = 0; i < keep; ++i) mass += prob[i];
    double r = uniform() * mass;
    for (int32_t i = 0; i < keep; ++i) {
        r -= prob[i];
        if (r < 0.0) return buf_[i].second;
    }
    return buf_[keep - 1].second;
}

}  // namespace wqe
