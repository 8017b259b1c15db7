// Small helpers shared by the command-line tools (which use the public C API only).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "wqedge.h"

namespace tools {

struct Args {
    std::vector<std::string> argv;
    explicit Args(int argc, char** argv_);
    bool flag(const std::string& name);                         // --name present
    std::string str(const std::string& a, const std::string& b, const std::string& dflt);
    // An integer option; outside [lo, hi] (by default the int range, so nothing wraps when the caller
    // narrows it) is an error naming the option.
    long num(const std::string& a, const std::string& b, long dflt, long lo = INT32_MIN, long hi = INT32_MAX);
    double real(const std::string& a, const std::string& b, double dflt);
    void done(const char* usage);  // fail on leftover arguments
};

[[noreturn]] void die(const std::string& msg);
void ok(int status, const char* what);  // die with wqe_last_error() unless status == WQE_OK
double now_s();
double cpu_s();  // CPU time of the whole process (user + system), for timings on busy machines
std::string read_file(const std::string& path);
std::vector<int32_t> tokenize(const wqe_model* m, const std::string& text, int add_bos);
std::string piece(const wqe_model* m, int32_t tok);
long peak_rss_kib();

}  // namespace tools
