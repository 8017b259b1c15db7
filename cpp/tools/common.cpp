#include "common.h"

#include <sys/resource.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>

namespace tools {

Args::Args(int argc, char** a) : argv(a + 1, a + argc) {}

static bool take(std::vector<std::string>& v, const std::string& a, const std::string& b, std::string* out) {
    for (size_t i = 0; i < v.size(); ++i)
        if (v[i] == a || (!b.empty() && v[i] == b)) {
            if (i + 1 >= v.size()) die("option " + v[i] + " needs a value");
            *out = v[i + 1];
            v.erase(v.begin() + i, v.begin() + i + 2);
            return true;
        }
    return false;
}

bool Args::flag(const std::string& name) {
    for (size_t i = 0; i < argv.size(); ++i)
        if (argv[i] == name) {
            argv.erase(argv.begin() + i);
            return true;
        }
    return false;
}

std::string Args::str(const std::string& a, const std::string& b, const std::string& dflt) {
    std::string v;
    return take(argv, a, b, &v) ? v : dflt;
}

long Args::num(const std::string& a, const std::string& b, long dflt, long lo, long hi) {
    std::string v;
    if (!take(argv, a, b, &v)) return dflt;
    char* end = nullptr;
    errno = 0;
    const long r = std::strtol(v.c_str(), &end, 10);
    if (!end || *end || v.empty()) die("option " + a + ": not an integer: " + v);
    if (errno == ERANGE || r < lo || r > hi)
        die("option " + a + ": " + v + " is outside [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
    return r;
}

double Args::real(const std::string& a, const std::string& b, double dflt) {
    std::string v;
    if (!take(argv, a, b, &v)) return dflt;
    char* end = nullptr;
    const double r = std::strtod(v.c_str(), &end);
    if (!end || *end) die("option " + a + ": not a number: " + v);
    return r;
}

void Args::done(const char* usage) {
    if (!argv.empty()) {
        std::fprintf(stderr, "unexpected argument '%s'\n\n%s", argv[0].c_str(), usage);
        std::exit(2);
    }
}

void die(const std::string& msg) {
    std::fprintf(stderr, "error: %s\n", msg.c_str());
    std::exit(1);
}

void ok(int status, const char* what) {
    if (status != WQE_OK) die(std::string(what) + ": " + wqe_last_error() + " [" + wqe_status_name(status) + "]");
}

double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::string read_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) die("cannot read " + path);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

std::vector<int32_t> tokenize(const wqe_model* m, const std::string& text, int add_bos) {
    int32_t n = 0;
    std::vector<int32_t> out(text.size() + 16);
    int st = wqe_tokenize(m, text.data(), text.size(), add_bos, out.data(), (int32_t)out.size(), &n);
    if (st == WQE_ERR_BUFFER_TOO_SMALL) {
        out.resize(n);
        st = wqe_tokenize(m, text.data(), text.size(), add_bos, out.data(), (int32_t)out.size(), &n);
    }
    ok(st, "tokenize");
    out.resize(n);
    return out;
}

std::string piece(const wqe_model* m, int32_t tok) {
    char buf[256];
    size_t len = 0;
    int st = wqe_token_to_piece(m, tok, 0, buf, sizeof buf, &len);
    if (st == WQE_ERR_BUFFER_TOO_SMALL) {
        std::string s(len + 1, '\0');
        ok(wqe_token_to_piece(m, tok, 0, &s[0], s.size(), &len), "token_to_piece");
        s.resize(len);
        return s;
    }
    ok(st, "token_to_piece");
    return std::string(buf, len);
}

double cpu_s() {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + 1e-6 * (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
}

// VmHWM where /proc has it: ru_maxrss survives exec, so a tool started by a large parent (a Python benchmark that
// imported torch) would report the parent's resident set, not its own (seen: 10 GB for a 0.7 GB model).
long peak_rss_kib() {
    if (FILE* f = std::fopen("/proc/self/status", "r")) {
        char line[256];
        long kib = -1;
        while (std::fgets(line, sizeof line, f))
            if (std::sscanf(line, "VmHWM: %ld kB", &kib) == 1) break;
        std::fclose(f);
        if (kib >= 0) return kib;
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_maxrss;
}

}  // namespace tools
