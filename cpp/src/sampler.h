// Token sampling: greedy, or temperature with optional top-k and top-p, from a seeded RNG.
#pragma once

#include <cstdint>
#include <vector>

#include "wqedge.h"

namespace wqe {

class Sampler {
public:
    explicit Sampler(const wqe_sampler_params& p);
    int32_t sample(const float* logits, int32_t n_vocab);
    double uniform();  // [0, 1)

private:
    wqe_sampler_params p_;
    uint64_t state_;
    std::vector<std::pair<float, int32_t>> buf_;
};

}  // namespace wqe
