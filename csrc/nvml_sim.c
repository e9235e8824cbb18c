/* p2pcheck's simulated NVML: a stand-in for libnvidia-ml.so.1 exporting the few functions
 * `p2pcheck doctor` calls, answering from a small text file, so that the doctor's real dlopen
 * path runs on CI machines without a GPU (tests/doctor.rs).
 *
 * Build:  cc -Wall -Wextra -Werror -std=gnu11 -O2 -fPIC -shared -o libnvml_sim.so nvml_sim.c
 *         (-DNVML_SIM_OLD_DRIVER leaves out the fabric functions, like a driver before R535)
 * Use:    P2PCHECK_LIBNVML=/abs/libnvml_sim.so P2PCHECK_NVML_SIM=/abs/nvml.txt p2pcheck doctor
 *
 * CONFIGURATION: P2PCHECK_NVML_SIM names the file, read by nvmlInit_v2 (every time: each
 * process reads its own). Unset, or a file that cannot be read: nvmlInit_v2 answers
 * NVML_ERROR_DRIVER_NOT_LOADED (9). One item per line, `#` starts a comment:
 *   init CODE              nvmlInit_v2 returns CODE (default 0, success)
 *   driver VERSION         nvmlSystemGetDriverVersion's text
 *   hang                   nvmlInit_v2 never returns (tests the caller's deadline)
 *   gpu BUSID [KEY=VALUE]...   a GPU, found by nvmlDeviceGetHandleByPciBusId_v2 (any spelling of
 *                          the same domain:bus:device.function). Keys:
 *       uuid=TEXT           nvmlDeviceGetUUID (default GPU-00000000-0000-0000-0000-<n>)
 *       persistence=0|1     nvmlDeviceGetPersistenceMode (default 1)
 *       mig=CUR/PENDING     nvmlDeviceGetMigMode (0 or 1 each); mig=none: NOT_SUPPORTED (default)
 *       compute=N           nvmlDeviceGetComputeMode: 0 default, 1 exclusive thread,
 *                           2 prohibited, 3 exclusive process (default 0)
 *       links=STATES        nvmlDeviceGetNvLinkState: one letter per link, U active, D
 *                           inactive; a link past the string is INVALID_ARGUMENT; no links
 *                           (the default): NOT_SUPPORTED for every link
 *       fabric=STATE/STATUS nvmlDeviceGetGpuFabricInfo(V): state 0..3, status an nvmlReturn_t;
 *                           fabric=none: NOT_SUPPORTED (the default)
 *   p2p BUSID BUSID READ WRITE NVLINK ATOMICS
 *                          nvmlDeviceGetP2PStatus for the pair, either order: each an
 *                          nvmlGpuP2PStatus_t (0 ok .. 6 unknown); pairs not listed: 0 (ok) for
 *                          read, write and atomics, 5 (not supported) for NVLink
 * A line that does not parse makes nvmlInit_v2 print it on stderr and answer NVML_ERROR_UNKNOWN
 * (999), so that a typo in a fixture can never pass for a machine.
 */

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_UNKNOWN = 999,
};

#define MAX_GPUS 64
#define MAX_PAIRS 256
#define MAX_LINKS 18
#define MAX_TEXT 96

struct gpu {
    unsigned domain, bus, dev, fn;
    char uuid[MAX_TEXT];
    unsigned persistence, compute;
    int mig_current, mig_pending; /* -1: not supported */
    char links[MAX_LINKS + 1];
    int fabric_state, fabric_status; /* state -1: not supported */
};

struct pair {
    struct gpu *a, *b;
    unsigned status[4]; /* read, write, nvlink, atomics: the caps index order */
};

static struct gpu gpus[MAX_GPUS];
static struct pair pairs[MAX_PAIRS];
static int n_gpus, n_pairs, initialized;
static char driver[MAX_TEXT] = "0.0";

/* "dddd:bb:dd.f", "dddddddd:bb:dd.f" or "bb:dd.f", in hex: the GPU's address, or -1. */
static int parse_bus_id(const char *s, unsigned *domain, unsigned *bus, unsigned *dev,
                        unsigned *fn) {
    char tail;
    if (sscanf(s, "%x:%x:%x.%x%c", domain, bus, dev, fn, &tail) == 4)
        return 0;
    *domain = 0;
    if (sscanf(s, "%x:%x.%x%c", bus, dev, fn, &tail) == 3)
        return 0;
    return -1;
}

static struct gpu *find_gpu(const char *bus_id) {
    unsigned d, b, v, f;
    if (parse_bus_id(bus_id, &d, &b, &v, &f) != 0)
        return NULL;
    for (int i = 0; i < n_gpus; i++)
        if (gpus[i].domain == d && gpus[i].bus == b && gpus[i].dev == v && gpus[i].fn == f)
            return &gpus[i];
    return NULL;
}

static int parse_gpu(char *rest) {
    if (n_gpus == MAX_GPUS)
        return -1;
    struct gpu *g = &gpus[n_gpus];
    memset(g, 0, sizeof *g);
    g->persistence = 1;
    g->mig_current = g->mig_pending = -1;
    g->fabric_state = -1;
    snprintf(g->uuid, sizeof g->uuid, "GPU-00000000-0000-0000-0000-%012d", n_gpus);
    char *save = NULL;
    char *tok = strtok_r(rest, " \t", &save);
    if (!tok || parse_bus_id(tok, &g->domain, &g->bus, &g->dev, &g->fn) != 0)
        return -1;
    while ((tok = strtok_r(NULL, " \t", &save))) {
        char *eq = strchr(tok, '=');
        if (!eq)
            return -1;
        *eq = 0;
        const char *v = eq + 1;
        char tail;
        if (!strcmp(tok, "uuid")) {
            if (strlen(v) >= sizeof g->uuid)
                return -1;
            strcpy(g->uuid, v);
        } else if (!strcmp(tok, "persistence")) {
            if (sscanf(v, "%u%c", &g->persistence, &tail) != 1 || g->persistence > 1)
                return -1;
        } else if (!strcmp(tok, "compute")) {
            if (sscanf(v, "%u%c", &g->compute, &tail) != 1 || g->compute > 3)
                return -1;
        } else if (!strcmp(tok, "mig")) {
            if (!strcmp(v, "none"))
                g->mig_current = g->mig_pending = -1;
            else if (sscanf(v, "%d/%d%c", &g->mig_current, &g->mig_pending, &tail) != 2 ||
                     g->mig_current < 0 || g->mig_current > 1 || g->mig_pending < 0 ||
                     g->mig_pending > 1)
                return -1;
        } else if (!strcmp(tok, "links")) {
            if (strlen(v) > MAX_LINKS || strspn(v, "UD") != strlen(v))
                return -1;
            strcpy(g->links, v);
        } else if (!strcmp(tok, "fabric")) {
            if (!strcmp(v, "none"))
                g->fabric_state = -1;
            else if (sscanf(v, "%d/%d%c", &g->fabric_state, &g->fabric_status, &tail) != 2 ||
                     g->fabric_state < 0 || g->fabric_state > 3)
                return -1;
        } else {
            return -1;
        }
    }
    n_gpus++;
    return 0;
}

static int parse_pair(char *rest) {
    if (n_pairs == MAX_PAIRS)
        return -1;
    char a[MAX_TEXT], b[MAX_TEXT], tail;
    unsigned s[4];
    if (sscanf(rest, "%95s %95s %u %u %u %u %c", a, b, &s[0], &s[1], &s[2], &s[3], &tail) != 6)
        return -1;
    struct pair *p = &pairs[n_pairs];
    p->a = find_gpu(a);
    p->b = find_gpu(b);
    if (!p->a || !p->b)
        return -1;
    for (int i = 0; i < 4; i++) {
        if (s[i] > 6)
            return -1;
        p->status[i] = s[i];
    }
    n_pairs++;
    return 0;
}

/* Reads the configuration; the nvmlReturn_t nvmlInit_v2 answers. */
static int load(void) {
    n_gpus = n_pairs = 0;
    const char *path = getenv("P2PCHECK_NVML_SIM");
    FILE *f = path ? fopen(path, "r") : NULL;
    if (!f)
        return NVML_ERROR_DRIVER_NOT_LOADED;
    char line[512];
    int code = NVML_SUCCESS, hang = 0;
    while (fgets(line, sizeof line, f)) {
        char *hash = strchr(line, '#');
        if (hash)
            *hash = 0;
        line[strcspn(line, "\r\n")] = 0;
        char *s = line;
        while (isspace((unsigned char)*s))
            s++;
        if (!*s)
            continue;
        int bad = 0;
        char tail;
        if (!strncmp(s, "gpu ", 4))
            bad = parse_gpu(s + 4);
        else if (!strncmp(s, "p2p ", 4))
            bad = parse_pair(s + 4);
        else if (!strncmp(s, "driver ", 7))
            bad = sscanf(s + 7, "%95s %c", driver, &tail) != 1;
        else if (!strncmp(s, "init ", 5))
            bad = sscanf(s + 5, "%d %c", &code, &tail) != 1;
        else if (!strcmp(s, "hang"))
            hang = 1;
        else
            bad = 1;
        if (bad) {
            fprintf(stderr, "nvml_sim: %s: cannot parse \"%s\"\n", path, s);
            code = NVML_ERROR_UNKNOWN;
            break;
        }
    }
    fclose(f);
    while (hang)
        pause();
    return code;
}

EXPORT int nvmlInit_v2(void) {
    int code = load();
    initialized = code == NVML_SUCCESS;
    return code;
}

EXPORT int nvmlShutdown(void) {
    if (!initialized)
        return NVML_ERROR_UNINITIALIZED;
    initialized = 0;
    return NVML_SUCCESS;
}

EXPORT const char *nvmlErrorString(int code) {
    switch (code) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    default: return "Unknown Error";
    }
}

static int copy_text(char *out, unsigned len, const char *text) {
    if (!out)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(text) + 1 > len)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(out, text);
    return NVML_SUCCESS;
}

EXPORT int nvmlSystemGetDriverVersion(char *out, unsigned len) {
    if (!initialized)
        return NVML_ERROR_UNINITIALIZED;
    return copy_text(out, len, driver);
}

EXPORT int nvmlDeviceGetHandleByPciBusId_v2(const char *bus_id, struct gpu **out) {
    if (!initialized)
        return NVML_ERROR_UNINITIALIZED;
    if (!bus_id || !out)
        return NVML_ERROR_INVALID_ARGUMENT;
    struct gpu *g = find_gpu(bus_id);
    if (!g)
        return NVML_ERROR_NOT_FOUND;
    *out = g;
    return NVML_SUCCESS;
}

/* The handle is one of ours: NVML answers INVALID_ARGUMENT for anything else. */
static int valid(const struct gpu *g) {
    return initialized && g >= gpus && g < gpus + n_gpus;
}

EXPORT int nvmlDeviceGetUUID(struct gpu *g, char *out, unsigned len) {
    if (!valid(g))
        return NVML_ERROR_INVALID_ARGUMENT;
    return copy_text(out, len, g->uuid);
}

EXPORT int nvmlDeviceGetPersistenceMode(struct gpu *g, unsigned *mode) {
    if (!valid(g) || !mode)
        return NVML_ERROR_INVALID_ARGUMENT;
    *mode = g->persistence;
    return NVML_SUCCESS;
}

EXPORT int nvmlDeviceGetComputeMode(struct gpu *g, unsigned *mode) {
    if (!valid(g) || !mode)
        return NVML_ERROR_INVALID_ARGUMENT;
    *mode = g->compute;
    return NVML_SUCCESS;
}

EXPORT int nvmlDeviceGetMigMode(struct gpu *g, unsigned *current, unsigned *pending) {
    if (!valid(g) || !current || !pending)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (g->mig_current < 0)
        return NVML_ERROR_NOT_SUPPORTED;
    *current = (unsigned)g->mig_current;
    *pending = (unsigned)g->mig_pending;
    return NVML_SUCCESS;
}

EXPORT int nvmlDeviceGetNvLinkState(struct gpu *g, unsigned link, unsigned *active) {
    if (!valid(g) || !active)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (!g->links[0])
        return NVML_ERROR_NOT_SUPPORTED;
    if (link >= strlen(g->links))
        return NVML_ERROR_INVALID_ARGUMENT;
    *active = g->links[link] == 'U';
    return NVML_SUCCESS;
}

EXPORT int nvmlDeviceGetP2PStatus(struct gpu *a, struct gpu *b, unsigned index,
                                  unsigned *status) {
    if (!valid(a) || !valid(b) || !status || index > 4)
        return NVML_ERROR_INVALID_ARGUMENT;
    /* The caps index order is READ, WRITE, NVLINK, ATOMICS, PROP. */
    unsigned slot = index == 4 ? 0 : index;
    for (int i = 0; i < n_pairs; i++) {
        if ((pairs[i].a == a && pairs[i].b == b) || (pairs[i].a == b && pairs[i].b == a)) {
            *status = pairs[i].status[slot];
            return NVML_SUCCESS;
        }
    }
    *status = slot == 2 ? 5 : 0;
    return NVML_SUCCESS;
}

#ifndef NVML_SIM_OLD_DRIVER
/* nvmlGpuFabricInfo_t and nvmlGpuFabricInfo_v2_t, as nvml.h declares them. */
struct fabric_v1 {
    unsigned char cluster_uuid[16];
    int status;
    unsigned clique_id;
    unsigned char state;
};

struct fabric_v2 {
    unsigned version;
    unsigned char cluster_uuid[16];
    int status;
    unsigned clique_id;
    unsigned char state;
    unsigned health_mask;
};

EXPORT int nvmlDeviceGetGpuFabricInfo(struct gpu *g, struct fabric_v1 *out) {
    if (!valid(g) || !out)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (g->fabric_state < 0)
        return NVML_ERROR_NOT_SUPPORTED;
    memset(out, 0, sizeof *out);
    out->state = (unsigned char)g->fabric_state;
    out->status = g->fabric_status;
    return NVML_SUCCESS;
}

EXPORT int nvmlDeviceGetGpuFabricInfoV(struct gpu *g, struct fabric_v2 *out) {
    if (!valid(g) || !out)
        return NVML_ERROR_INVALID_ARGUMENT;
    /* NVML_STRUCT_VERSION(GpuFabricInfo, 2): the size and the version in the top byte. */
    if (out->version != (unsigned)(sizeof *out | 2u << 24))
        return NVML_ERROR_INVALID_ARGUMENT;
    if (g->fabric_state < 0)
        return NVML_ERROR_NOT_SUPPORTED;
    memset(out->cluster_uuid, 0, sizeof out->cluster_uuid);
    out->state = (unsigned char)g->fabric_state;
    out->status = g->fabric_status;
    out->clique_id = 0;
    out->health_mask = 0;
    return NVML_SUCCESS;
}
#endif
