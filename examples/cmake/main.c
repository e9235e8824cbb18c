/* Checks every ordered pair of the visible GPUs and prints one line per pair: the verdict
   and, for a failure, the tier and the diagnosis. Exit code 0 when every pair works, 1 when
   some pair does not, 2 when the check could not be carried out. */

#include <p2pcheck.h>

#include <stdio.h>

int main(void) {
    static const char *verdicts[] = {"ok", "fails", "hang", "error"};
    static const char *tiers[] = {"copy", "kernel", "handshake"};
    char msg[1024];
    p2pcheck_report *report = NULL;
    p2pcheck_status status = p2pcheck_check(NULL, NULL, NULL, 0, &report, msg, sizeof msg);
    size_t pairs = 0, i;
    int all_ok = 1;
    if (status != P2PCHECK_STATUS_OK) {
        fprintf(stderr, "p2pcheck %s: %s: %s\n", p2pcheck_version(), p2pcheck_status_text(status),
                msg);
        return 2;
    }
    p2pcheck_report_pair_count(report, &pairs);
    for (i = 0; i < pairs; i++) {
        p2pcheck_pair_result p;
        p2pcheck_report_pair(report, i, &p);
        printf("%u->%u: %s", p.src, p.tgt, verdicts[p.verdict & 3]);
        if (p.failed_tier != P2PCHECK_LEVEL_NONE) {
            printf(" (%s tier, %s)", tiers[p.failed_tier % 3],
                   p2pcheck_class_name((p2pcheck_class)p.diagnosis));
        }
        printf("\n");
        all_ok &= p.ok;
    }
    p2pcheck_report_free(report);
    return all_ok ? 0 : 1;
}
