// Block-kind names on the command line of the C++ benchmarks (matvec_bench, tile_kernel_bench): "q4" -> its id,
// "mix:q3,q2" or "q3,q2" -> the ids in order. Names as cpp/src/blocks.h numbers the one-scale kinds.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

static int kind_id(const std::string& s) {
    const char* names[] = {"fp16", "q8", "q4", "q3", "q2", "ternary", "q1"};
    for (int i = 0; i < 7; ++i)
        if (s == names[i]) return i;
    fprintf(stderr, "unknown kind %s\n", s.c_str());
    exit(2);
}

static std::vector<int> parse_kinds(const std::string& spec) {
    std::vector<int> ids;
    std::string s = spec.rfind("mix:", 0) == 0 ? spec.substr(4) : spec;
    size_t p = 0;
    while (p <= s.size()) {
        size_t e = s.find(',', p);
        if (e == std::string::npos) e = s.size();
        ids.push_back(kind_id(s.substr(p, e - p)));
        p = e + 1;
    }
    return ids;
}
