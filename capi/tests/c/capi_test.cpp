// p2pcheck.h from C++: compiled with -Wall -Wextra -Wpedantic -Werror (and the C++-only
// warnings about old-style casts and 0 as a null pointer), linked with libp2pcheck.a, run by
// tests/capi.rs on 2 simulated GPUs where 1->0 passes vLLM's copy test but SM accesses fail.

#include "p2pcheck.h"

#include <chrono>
#include <cstddef>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

static_assert(sizeof(p2pcheck_pair_result) == 48, "p2pcheck_pair_result is 48 bytes");
static_assert(alignof(p2pcheck_pair_result) == 4, "p2pcheck_pair_result is 4-aligned");
static_assert(offsetof(p2pcheck_pair_result, persistable) == 44, "the last field is at 44");

namespace {

struct OptionsFree {
    void operator()(p2pcheck_options *o) const { p2pcheck_options_free(o); }
};
struct ReportFree {
    void operator()(p2pcheck_report *r) const { p2pcheck_report_free(r); }
};
struct PendingFree {
    void operator()(p2pcheck_pending *p) const { p2pcheck_pending_free(p); }
};
using Options = std::unique_ptr<p2pcheck_options, OptionsFree>;
using Report = std::unique_ptr<p2pcheck_report, ReportFree>;
using Pending = std::unique_ptr<p2pcheck_pending, PendingFree>;

// A pair's details as a std::string: the size first, then the text.
std::string details(const p2pcheck_report *r, size_t i) {
    size_t needed = 0;
    if (p2pcheck_report_pair_details(r, i, nullptr, 0, &needed) !=
        P2PCHECK_STATUS_BUFFER_TOO_SMALL && needed != 0) {
        return "<size query failed>";
    }
    std::vector<char> buf(needed + 1);
    if (p2pcheck_report_pair_details(r, i, buf.data(), buf.size(), &needed) !=
        P2PCHECK_STATUS_OK) {
        return "<details failed>";
    }
    return std::string(buf.data());
}

void print(const char *key, const p2pcheck_report *r) {
    size_t n = 0;
    p2pcheck_report_pair_count(r, &n);
    std::printf("%s.pairs: %zu\n", key, n);
    for (size_t i = 0; i < n; i++) {
        p2pcheck_pair_result p{};
        p2pcheck_report_pair(r, i, &p);
        std::string d = details(r, i);
        std::printf("%s.pair.%zu: %u->%u ok=%d copy=%d kernel=%d handshake=%d failed_tier=%d "
                    "class=%s details=%d\n",
                    key, i, p.src, p.tgt, p.ok, p.copy, p.kernel, p.handshake, p.failed_tier,
                    p2pcheck_class_name(static_cast<p2pcheck_class>(p.diagnosis)), !d.empty());
        if (!d.empty()) {
            std::printf("%s.details.%zu: %s\n", key, i, d.substr(0, d.find('\n')).c_str());
        }
    }
}

}  // namespace

int main() {
    char msg[512];
    Options opts(p2pcheck_options_new());
    p2pcheck_status s =
        p2pcheck_options_set_simulation(opts.get(), 2, "1->0:sm-only", msg, sizeof msg);
    std::printf("set_simulation: %d %s\n", static_cast<int>(s), msg);
    s = p2pcheck_options_set_level(opts.get(), P2PCHECK_LEVEL_KERNEL, msg, sizeof msg);
    std::printf("set_level: %d %s\n", static_cast<int>(s), msg);
    s = p2pcheck_options_set_kernel_bytes(opts.get(), 256 * 1024, msg, sizeof msg);
    std::printf("set_kernel_bytes: %d %s\n", static_cast<int>(s), msg);

    p2pcheck_report *raw = nullptr;
    s = p2pcheck_check(opts.get(), nullptr, nullptr, 0, &raw, msg, sizeof msg);
    Report report(raw);
    std::printf("check: %d %s\n", static_cast<int>(s), p2pcheck_status_text(s));
    print("check", report.get());

    // In the background, polled as an event loop would.
    const uint32_t src[] = {1}, tgt[] = {0};
    p2pcheck_pending *pending_raw = nullptr;
    s = p2pcheck_start(opts.get(), src, tgt, 1, &pending_raw, msg, sizeof msg);
    Pending pending(pending_raw);
    std::printf("start: %d\n", static_cast<int>(s));
    int polls = 0;
    do {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
        s = p2pcheck_pending_try_wait(pending.get(), &raw, msg, sizeof msg);
        polls++;
    } while (s == P2PCHECK_STATUS_NOT_READY && polls < 6000);
    Report background(raw);
    std::printf("try_wait: %d\n", static_cast<int>(s));
    print("background", background.get());
    return 0;
}
