/*
 * A stand-in for the NVIDIA driver's libnvidia-ml.so.1, for tests on machines without a GPU.
 *
 * nvidia-ml-py loads "libnvidia-ml.so.1" with ctypes and looks up each C function by name, so
 * this library, built with `gcc -shared -fPIC -o DIR/libnvidia-ml.so.1 fake_nvml.c` and put
 * first on LD_LIBRARY_PATH, lets the real Python bindings run unchanged against scripted GPUs.
 *
 * FAKE_NVML_CONFIG names a text file, read at nvmlInit and again whenever the file changes
 * (a new inode, mtime or size), so a test can change a GPU's state while the process runs.
 * Without it the library shows eight healthy "NVIDIA H100 80GB HBM3".
 *
 * Lines: blank and '#' lines are ignored; a line holding '|' describes one GPU, in NVML index
 * order; any other line is a global "key=value".
 *
 *   name|uuid|mem_total_mib|mem_used_mib|mem_reserved_mib|temp_c|util_pct|procs|lost|pci_bus_id|switch|numa
 *       |ecc_dbe|retired_pending|rows_correctable|rows_uncorrectable|remap_pending|remap_failure|nvlink_peers
 *
 * The fields after numa are optional (0 when left out): the volatile double-bit ECC count, whether
 * retired pages are pending, the remapped-row counters and flags, and the NVML indices of the
 * GPUs at the far end of each NVLink, space-separated ("1 1 1 1": four links to GPU 1; empty: no
 * NVLink, and the NVLink queries answer Not Supported).
 *
 * Any numeric field, and name or uuid, may be "NA": that query answers NVML_ERROR_NOT_SUPPORTED
 * (an NA memory field makes the whole memory query Not Supported). lost=1 makes every
 * per-device query answer NVML_ERROR_GPU_IS_LOST; its handle can still be obtained.
 * mem_used is used memory without the driver's reservation (what nvmlDeviceGetMemoryInfo_v2
 * reports); the v1 query counts reserved memory as used, as the real driver does.
 * Topology: GPUs with the same switch number share a PCIe switch (NVML_TOPOLOGY_SINGLE),
 * the same numa number a CPU (NVML_TOPOLOGY_MULTIPLE here, so there are three tiers);
 * otherwise NVML_TOPOLOGY_SYSTEM. A GPU's CPU affinity is the CPU list of its numa node (see
 * numa_cpus) and its memory affinity that node alone. The CPUs need not exist on the machine
 * that runs the test: the stand-in describes a node, as a real driver describes its own.
 *
 * Globals:
 *   driver_version=550.54.15
 *   init_error=N          nvmlInit answers error N (e.g. 9: driver not loaded)
 *   memory_v2_error=N     nvmlDeviceGetMemoryInfo_v2 answers error N (13: function not found,
 *                         as from a driver that predates it; 25: argument version mismatch)
 *   numa_cpus=0-31;32-63  the CPUs of each numa node, ';' between nodes (node 0 first), each a
 *                         Linux CPU list ("0-3,8-11"); "NA" makes both affinity queries Not
 *                         Supported. The default is two nodes of 32 CPUs, as above.
 *
 * Two more files beside the config, which tests write while the process runs:
 *
 *   <config>.hang         while it exists, every call blocks (a wedged driver); removing it lets
 *                         the blocked calls return.
 *   <config>.events       lines "uuid|event_type|event_data", appended (e.g. "GPU-...|8|79" is Xid
 *                         79, "GPU-...|2|0" a double-bit ECC error). As with the real driver, an
 *                         event set receives the events that come after it was created, once, for
 *                         the devices and event types registered on it; so every process that
 *                         watches sees every event once.
 */
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

typedef int nvmlReturn_t;

enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_TIMEOUT = 10,
    NVML_ERROR_FUNCTION_NOT_FOUND = 13,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
    NVML_ERROR_UNKNOWN = 999,
};

enum {
    NVML_TOPOLOGY_INTERNAL = 0,
    NVML_TOPOLOGY_SINGLE = 10,
    NVML_TOPOLOGY_MULTIPLE = 20,
    NVML_TOPOLOGY_SYSTEM = 50,
};

#define MAX_GPUS 64
#define MAX_NUMA 16
#define MAX_CPUS 1024
#define MASK_BITS 64
#define MAX_LINKS 18
#define FIELDS 19
#define EVENT_TYPE_SINGLE_BIT_ECC 0x1ULL
#define EVENT_TYPE_DOUBLE_BIT_ECC 0x2ULL
#define EVENT_TYPE_XID 0x8ULL
#define SUPPORTED_EVENTS (EVENT_TYPE_SINGLE_BIT_ECC | EVENT_TYPE_DOUBLE_BIT_ECC | EVENT_TYPE_XID)
#define EVENT_POLL_MS 50
#define NA (-1LL)
#define MIB (1024ULL * 1024ULL)
#define NVML_MEMORY_V2_VERSION 0x02000028u
#define NVML_TEMPERATURE_V1_VERSION 0x0100000Cu

typedef struct {
    unsigned long long total, free, used;
} nvmlMemory_t;

typedef struct {
    unsigned int version;
    unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t;

typedef struct {
    unsigned int gpu, memory;
} nvmlUtilization_t;

typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_t;

typedef struct {
    char busIdLegacy[16];
    unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;

typedef struct {
    unsigned int version;
    unsigned int sensorType;
    int temperature;
} nvmlTemperature_t;

struct fake_gpu {
    char name[96];
    char uuid[96];
    int name_na, uuid_na;
    long long mem_total, mem_used, mem_reserved; /* MiB, or NA */
    long long temp, util, procs;
    int lost;
    char pci_bus_id[32];
    int pci_bus;
    int sw, numa;
    long long ecc_dbe, retired_pending, rows_correctable, rows_uncorrectable, remap_pending, remap_failure;
    int nvlink_peers[MAX_LINKS];
    int nvlinks;
};

typedef struct fake_gpu *nvmlDevice_t;

static pthread_mutex_t state_lock = PTHREAD_MUTEX_INITIALIZER;
static struct fake_gpu gpus[MAX_GPUS];
static unsigned int gpu_count;
static int init_refcount;
static char driver_version[80] = "550.54.15";
static int init_error;
static int memory_v2_error;
/* numa_cpu_mask[node][word]: bit b of word w is CPU w*64+b; affinity_na answers Not Supported. */
static unsigned long long numa_cpu_mask[MAX_NUMA][MAX_CPUS / MASK_BITS];
static int affinity_na;
static struct stat config_stat;
static int config_seen;

static void set_default_gpu(struct fake_gpu *g, unsigned int i)
{
    memset(g, 0, sizeof(*g));
    snprintf(g->name, sizeof(g->name), "NVIDIA H100 80GB HBM3");
    snprintf(g->uuid, sizeof(g->uuid), "GPU-00000000-0000-0000-0000-%012u", i);
    g->mem_total = 81559;
    g->mem_used = 0;
    g->mem_reserved = 0;
    g->temp = 30 + i;
    g->util = 0;
    g->procs = 0;
    g->pci_bus = 0x18 + 0x10 * i;
    snprintf(g->pci_bus_id, sizeof(g->pci_bus_id), "00000000:%02X:00.0", g->pci_bus);
    g->sw = i / 2;
    g->numa = i / 4;
}

/* Set the CPUs of each numa node from "0-31;32-63" ("NA": no affinity answers). */
static void parse_numa_cpus(const char *text)
{
    memset(numa_cpu_mask, 0, sizeof(numa_cpu_mask));
    affinity_na = strcmp(text, "NA") == 0;
    int node = 0;
    const char *p = text;
    while (!affinity_na && node < MAX_NUMA && *p != '\0') {
        if (*p == ';' || *p == ',') {
            node += *p == ';';
            p++;
            continue;
        }
        char *end;
        long first = strtol(p, &end, 10), last = first;
        if (end == p) {
            p++;
            continue;
        }
        if (*end == '-')
            last = strtol(end + 1, &end, 10);
        p = end;
        for (long cpu = first < 0 ? 0 : first; cpu <= last && cpu < MAX_CPUS; cpu++)
            numa_cpu_mask[node][cpu / MASK_BITS] |= 1ULL << (cpu % MASK_BITS);
    }
}

static void load_defaults(void)
{
    parse_numa_cpus("0-31;32-63");
    gpu_count = 8;
    for (unsigned int i = 0; i < gpu_count; i++)
        set_default_gpu(&gpus[i], i);
    snprintf(driver_version, sizeof(driver_version), "550.54.15");
    init_error = 0;
    memory_v2_error = 0;
}

static char *trim(char *s)
{
    while (*s == ' ' || *s == '\t')
        s++;
    char *end = s + strlen(s);
    while (end > s && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\n' || end[-1] == '\r'))
        *--end = '\0';
    return s;
}

static long long parse_num(const char *s, long long fallback)
{
    if (s == NULL || *s == '\0')
        return fallback;
    if (strcmp(s, "NA") == 0)
        return NA;
    return strtoll(s, NULL, 0);
}

static void copy_text(char *dst, size_t size, const char *src, int *na)
{
    *na = src != NULL && strcmp(src, "NA") == 0;
    if (src != NULL && !*na)
        snprintf(dst, size, "%s", src);
}

static void parse_gpu_line(char *line)
{
    if (gpu_count >= MAX_GPUS)
        return;
    struct fake_gpu *g = &gpus[gpu_count];
    set_default_gpu(g, gpu_count);
    char *field[FIELDS] = {0};
    int n = 0;
    char *tok;
    while (n < FIELDS && (tok = strsep(&line, "|")) != NULL)
        field[n++] = trim(tok);

    copy_text(g->name, sizeof(g->name), field[0], &g->name_na);
    copy_text(g->uuid, sizeof(g->uuid), field[1], &g->uuid_na);
    g->mem_total = parse_num(field[2], g->mem_total);
    g->mem_used = parse_num(field[3], g->mem_used);
    g->mem_reserved = parse_num(field[4], g->mem_reserved);
    g->temp = parse_num(field[5], g->temp);
    g->util = parse_num(field[6], g->util);
    g->procs = parse_num(field[7], g->procs);
    g->lost = parse_num(field[8], 0) == 1;
    if (field[9] != NULL && *field[9] != '\0') {
        unsigned int dom = 0, bus = 0;
        snprintf(g->pci_bus_id, sizeof(g->pci_bus_id), "%s", field[9]);
        if (sscanf(field[9], "%x:%x", &dom, &bus) == 2)
            g->pci_bus = (int)bus;
    }
    g->sw = (int)parse_num(field[10], g->sw);
    g->numa = (int)parse_num(field[11], g->numa);
    g->ecc_dbe = parse_num(field[12], 0);
    g->retired_pending = parse_num(field[13], 0);
    g->rows_correctable = parse_num(field[14], 0);
    g->rows_uncorrectable = parse_num(field[15], 0);
    g->remap_pending = parse_num(field[16], 0);
    g->remap_failure = parse_num(field[17], 0);
    char *peers = field[18];
    while (peers != NULL && g->nvlinks < MAX_LINKS && (tok = strsep(&peers, " ")) != NULL) {
        if (*tok != '\0')
            g->nvlink_peers[g->nvlinks++] = (int)strtol(tok, NULL, 0);
    }
    gpu_count++;
}

static void parse_global_line(char *line)
{
    char *eq = strchr(line, '=');
    if (eq == NULL)
        return;
    *eq = '\0';
    char *key = trim(line), *value = trim(eq + 1);
    if (strcmp(key, "driver_version") == 0)
        snprintf(driver_version, sizeof(driver_version), "%s", value);
    else if (strcmp(key, "init_error") == 0)
        init_error = (int)strtol(value, NULL, 0);
    else if (strcmp(key, "memory_v2_error") == 0)
        memory_v2_error = (int)strtol(value, NULL, 0);
    else if (strcmp(key, "numa_cpus") == 0)
        parse_numa_cpus(value);
}

/* Parse the config file; an unreadable or absent file leaves the defaults. */
static void load_config(const char *path)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return;
    char buf[1024];
    int saw_gpu = 0;
    while (fgets(buf, sizeof(buf), f) != NULL) {
        char *line = trim(buf);
        if (*line == '\0' || *line == '#')
            continue;
        if (strchr(line, '|') != NULL) {
            if (!saw_gpu) {
                gpu_count = 0;
                saw_gpu = 1;
            }
            parse_gpu_line(line);
        } else {
            parse_global_line(line);
        }
    }
    fclose(f);
}

static int same_file_state(const struct stat *a, const struct stat *b)
{
    return a->st_ino == b->st_ino && a->st_dev == b->st_dev && a->st_size == b->st_size &&
           a->st_mtim.tv_sec == b->st_mtim.tv_sec && a->st_mtim.tv_nsec == b->st_mtim.tv_nsec;
}

/* Re-read the config when it changed since the last read; called with state_lock held. */
static void refresh_locked(int force)
{
    const char *path = getenv("FAKE_NVML_CONFIG");
    if (path == NULL || *path == '\0') {
        if (force)
            load_defaults();
        return;
    }
    struct stat st;
    int have = stat(path, &st) == 0;
    if (!force && (!have || (config_seen && same_file_state(&st, &config_stat))))
        return;
    load_defaults();
    load_config(path);
    config_seen = have;
    if (have)
        config_stat = st;
}

/* "<config><suffix>", or "" without a config. */
static void beside_config(char *dst, size_t size, const char *suffix)
{
    const char *path = getenv("FAKE_NVML_CONFIG");
    if (path == NULL || *path == '\0')
        *dst = '\0';
    else
        snprintf(dst, size, "%s%s", path, suffix);
}

static void sleep_ms(long ms)
{
    struct timespec pause = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&pause, NULL);
}

/* Block while the hang switch exists, as a call into a wedged driver does. */
static void wait_while_hung(void)
{
    char path[4096];
    beside_config(path, sizeof(path), ".hang");
    while (*path != '\0' && access(path, F_OK) == 0)
        sleep_ms(20);
}

/* Lock the state, refresh it, and check the library is initialised. */
static nvmlReturn_t enter(void)
{
    wait_while_hung();
    pthread_mutex_lock(&state_lock);
    if (init_refcount == 0) {
        pthread_mutex_unlock(&state_lock);
        return NVML_ERROR_UNINITIALIZED;
    }
    refresh_locked(0);
    return NVML_SUCCESS;
}

static nvmlReturn_t leave(nvmlReturn_t ret)
{
    pthread_mutex_unlock(&state_lock);
    return ret;
}

/* Lock the state and validate a device handle; lost GPUs answer GPU_IS_LOST. */
static nvmlReturn_t enter_device(nvmlDevice_t device)
{
    nvmlReturn_t ret = enter();
    if (ret != NVML_SUCCESS)
        return ret;
    if (device == NULL || device < gpus || device >= gpus + gpu_count)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    if (device->lost)
        return leave(NVML_ERROR_GPU_IS_LOST);
    return NVML_SUCCESS;
}

static nvmlReturn_t copy_out(char *dst, unsigned int length, const char *src)
{
    if (dst == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(src) + 1 > length)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(dst, src, strlen(src) + 1);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags)
{
    (void)flags;
    wait_while_hung();
    pthread_mutex_lock(&state_lock);
    if (init_refcount == 0)
        refresh_locked(1);
    if (init_error != 0) {
        int err = init_error;
        pthread_mutex_unlock(&state_lock);
        return err;
    }
    init_refcount++;
    pthread_mutex_unlock(&state_lock);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlShutdown(void)
{
    pthread_mutex_lock(&state_lock);
    nvmlReturn_t ret = NVML_SUCCESS;
    if (init_refcount == 0)
        ret = NVML_ERROR_UNINITIALIZED;
    else
        init_refcount--;
    pthread_mutex_unlock(&state_lock);
    return ret;
}

const char *nvmlErrorString(nvmlReturn_t result)
{
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_TIMEOUT: return "Timeout";
    case NVML_ERROR_FUNCTION_NOT_FOUND: return "Function Not Found";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Argument version mismatch";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
    nvmlReturn_t ret = enter();
    if (ret != NVML_SUCCESS)
        return ret;
    return leave(copy_out(version, length, driver_version));
}

nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length)
{
    nvmlReturn_t ret = enter();
    if (ret != NVML_SUCCESS)
        return ret;
    char buf[96];
    snprintf(buf, sizeof(buf), "12.%s", driver_version);
    return leave(copy_out(version, length, buf));
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *version)
{
    nvmlReturn_t ret = enter();
    if (ret != NVML_SUCCESS)
        return ret;
    if (version == NULL)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    *version = 12040;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *version) { return nvmlSystemGetCudaDriverVersion(version); }

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count)
{
    nvmlReturn_t ret = enter();
    if (ret != NVML_SUCCESS)
        return ret;
    if (count == NULL)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    *count = gpu_count;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetCount(unsigned int *count) { return nvmlDeviceGetCount_v2(count); }

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    nvmlReturn_t ret = enter();
    if (ret != NVML_SUCCESS)
        return ret;
    if (device == NULL || index >= gpu_count)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    *device = &gpus[index];
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device)
{
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device)
{
    nvmlReturn_t ret = enter();
    if (ret != NVML_SUCCESS)
        return ret;
    if (uuid == NULL || device == NULL)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    for (unsigned int i = 0; i < gpu_count; i++) {
        if (!gpus[i].uuid_na && strcmp(gpus[i].uuid, uuid) == 0) {
            *device = &gpus[i];
            return leave(NVML_SUCCESS);
        }
    }
    return leave(NVML_ERROR_NOT_FOUND);
}

nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index)
{
    nvmlReturn_t ret = enter_device(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (index == NULL)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    *index = (unsigned int)(device - gpus);
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t device, unsigned int *minor)
{
    return nvmlDeviceGetIndex(device, minor);
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length)
{
    nvmlReturn_t ret = enter_device(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (device->name_na)
        return leave(NVML_ERROR_NOT_SUPPORTED);
    return leave(copy_out(name, length, device->name));
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)
{
    nvmlReturn_t ret = enter_device(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (device->uuid_na)
        return leave(NVML_ERROR_NOT_SUPPORTED);
    return leave(copy_out(uuid, length, device->uuid));
}

static int memory_na(const struct fake_gpu *g)
{
    return g->mem_total == NA || g->mem_used == NA || g->mem_reserved == NA;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory)
{
    nvmlReturn_t ret = enter_device(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (memory == NULL)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    if (memory_na(device))
        return leave(NVML_ERROR_NOT_SUPPORTED);
    memory->total = (unsigned long long)device->mem_total * MIB;
    memory->used = (unsigned long long)(device->mem_used + device->mem_reserved) * MIB;
    memory->free = memory->total - memory->used;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory)
{
    nvmlReturn_t ret = enter_device(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (memory_v2_error != 0)
        return leave(memory_v2_error);
    if (memory == NULL)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    if (memory->version != NVML_MEMORY_V2_VERSION)
        return leave(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    if (memory_na(device))
        return leave(NVML_ERROR_NOT_SUPPORTED);
    memory->total = (unsigned long long)device->mem_total * MIB;
    memory->reserved = (unsigned long long)device->mem_reserved * MIB;
    memory->used = (unsigned long long)device->mem_used * MIB;
    memory->free = memory->total - memory->reserved - memory->used;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, unsigned int sensor, unsigned int *temp)
{
    nvmlReturn_t ret = enter_device(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (temp == NULL || sensor != 0)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    if (device->temp == NA)
        return leave(NVML_ERROR_NOT_SUPPORTED);
    *temp = (unsigned int)device->temp;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetTemperatureV(nvmlDevice_t device, nvmlTemperature_t *temperature)
{
    if (temperature == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (temperature->version != NVML_TEMPERATURE_V1_VERSION)
        return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    unsigned int value = 0;
    nvmlReturn_t ret = nvmlDeviceGetTemperature(device, temperature->sensorType, &value);
    if (ret == NVML_SUCCESS)
        temperature->temperature = (int)value;
    return ret;
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization)
{
    nvmlReturn_t ret = enter_device(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (utilization == NULL)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    if (device->util == NA)
        return leave(NVML_ERROR_NOT_SUPPORTED);
    utilization->gpu = (unsigned int)device->util;
    utilization->memory = (unsigned int)device->util / 2;
    return leave(NVML_SUCCESS);
}

/* NVML's two-call protocol: a short buffer gets the count and INSUFFICIENT_SIZE. */
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *count,
                                                     nvmlProcessInfo_t *infos)
{
    nvmlReturn_t ret = enter_device(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (count == NULL)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    if (device->procs == NA)
        return leave(NVML_ERROR_NOT_SUPPORTED);
    unsigned int n = (unsigned int)device->procs;
    if (infos == NULL || *count < n) {
        *count = n;
        return leave(n == 0 ? NVML_SUCCESS : NVML_ERROR_INSUFFICIENT_SIZE);
    }
    unsigned int index = (unsigned int)(device - gpus);
    for (unsigned int i = 0; i < n; i++) {
        infos[i].pid = 10000 + 100 * index + i;
        infos[i].usedGpuMemory = 512ULL * MIB;
        infos[i].gpuInstanceId = 0xFFFFFFFFu;
        infos[i].computeInstanceId = 0xFFFFFFFFu;
    }
    *count = n;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci)
{
    nvmlReturn_t ret = enter_device(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (pci == NULL)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    memset(pci, 0, sizeof(*pci));
    snprintf(pci->busId, sizeof(pci->busId), "%s", device->pci_bus_id);
    snprintf(pci->busIdLegacy, sizeof(pci->busIdLegacy), "0000:%02X:00.0", device->pci_bus & 0xFF);
    pci->domain = 0;
    pci->bus = (unsigned int)device->pci_bus;
    pci->device = 0;
    pci->pciDeviceId = 0x233010DEu;
    pci->pciSubSystemId = 0x16C110DEu;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetTopologyCommonAncestor(nvmlDevice_t device1, nvmlDevice_t device2,
                                                 unsigned int *level)
{
    nvmlReturn_t ret = enter_device(device1);
    if (ret != NVML_SUCCESS)
        return ret;
    if (device2 == NULL || device2 < gpus || device2 >= gpus + gpu_count || level == NULL)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    if (device2->lost)
        return leave(NVML_ERROR_GPU_IS_LOST);
    if (device1 == device2)
        *level = NVML_TOPOLOGY_INTERNAL;
    else if (device1->sw == device2->sw)
        *level = NVML_TOPOLOGY_SINGLE;
    else if (device1->numa == device2->numa)
        *level = NVML_TOPOLOGY_MULTIPLE;
    else
        *level = NVML_TOPOLOGY_SYSTEM;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetNumaNodeId(nvmlDevice_t device, unsigned int *node)
{
    nvmlReturn_t ret = enter_device(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (node == NULL)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    *node = (unsigned int)device->numa;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetCudaComputeCapability(nvmlDevice_t device, int *major, int *minor)
{
    nvmlReturn_t ret = enter_device(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (major == NULL || minor == NULL)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    *major = 9;
    *minor = 0;
    return leave(NVML_SUCCESS);
}

/* Error type 1 is uncorrected (double-bit); counter type 0 volatile, 1 aggregate: both report ecc_dbe. */
nvmlReturn_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t device, unsigned int error_type, unsigned int counter_type,
                                         unsigned long long *count)
{
    nvmlReturn_t ret = enter_device(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (count == NULL || error_type > 1 || counter_type > 1)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    if (device->ecc_dbe == NA)
        return leave(NVML_ERROR_NOT_SUPPORTED);
    *count = error_type == 1 ? (unsigned long long)device->ecc_dbe : 0;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetRetiredPagesPendingStatus(nvmlDevice_t device, unsigned int *pending)
{
    nvmlReturn_t ret = enter_device(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (pending == NULL)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    if (device->retired_pending == NA)
        return leave(NVML_ERROR_NOT_SUPPORTED);
    *pending = device->retired_pending ? 1 : 0;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetRemappedRows(nvmlDevice_t device, unsigned int *correctable, unsigned int *uncorrectable,
                                       unsigned int *pending, unsigned int *failure)
{
    nvmlReturn_t ret = enter_device(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (correctable == NULL || uncorrectable == NULL || pending == NULL || failure == NULL)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    if (device->rows_correctable == NA || device->rows_uncorrectable == NA)
        return leave(NVML_ERROR_NOT_SUPPORTED);
    *correctable = (unsigned int)device->rows_correctable;
    *uncorrectable = (unsigned int)device->rows_uncorrectable;
    *pending = device->remap_pending ? 1 : 0;
    *failure = device->remap_failure ? 1 : 0;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetNvLinkState(nvmlDevice_t device, unsigned int link, unsigned int *active)
{
    nvmlReturn_t ret = enter_device(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (active == NULL)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    if (device->nvlinks == 0)
        return leave(NVML_ERROR_NOT_SUPPORTED);
    if (link >= MAX_LINKS)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    *active = link < (unsigned int)device->nvlinks;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetNvLinkRemotePciInfo_v2(nvmlDevice_t device, unsigned int link, nvmlPciInfo_t *pci)
{
    nvmlReturn_t ret = enter_device(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (pci == NULL || link >= (unsigned int)device->nvlinks)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    int peer = device->nvlink_peers[link];
    if (peer < 0 || (unsigned int)peer >= gpu_count)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    memset(pci, 0, sizeof(*pci));
    snprintf(pci->busId, sizeof(pci->busId), "%s", gpus[peer].pci_bus_id);
    pci->bus = (unsigned int)gpus[peer].pci_bus;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t device, unsigned long long *types)
{
    nvmlReturn_t ret = enter_device(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (types == NULL)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    *types = SUPPORTED_EVENTS;
    return leave(NVML_SUCCESS);
}

typedef struct {
    nvmlDevice_t device;
    unsigned long long eventType;
    unsigned long long eventData;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlEventData_t;

/* An event set reads the events file from where it stood when the set was made. */
struct fake_event_set {
    long offset;
    unsigned long long registered[MAX_GPUS];
};

typedef struct fake_event_set *nvmlEventSet_t;

static long events_file_size(void)
{
    char path[4096];
    struct stat st;
    beside_config(path, sizeof(path), ".events");
    return *path != '\0' && stat(path, &st) == 0 ? (long)st.st_size : 0;
}

nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set)
{
    nvmlReturn_t ret = enter();
    if (ret != NVML_SUCCESS)
        return ret;
    if (set == NULL)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    *set = calloc(1, sizeof(**set));
    if (*set == NULL)
        return leave(NVML_ERROR_UNKNOWN);
    (*set)->offset = events_file_size();
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long types, nvmlEventSet_t set)
{
    nvmlReturn_t ret = enter_device(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (set == NULL)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    if (types & ~SUPPORTED_EVENTS)
        return leave(NVML_ERROR_NOT_SUPPORTED);
    set->registered[device - gpus] |= types;
    return leave(NVML_SUCCESS);
}

/* The next whole line of the events file that the set is registered for; 1 when one was found. */
static int next_event_locked(nvmlEventSet_t set, nvmlEventData_t *data)
{
    char path[4096], line[512];
    beside_config(path, sizeof(path), ".events");
    FILE *f = *path != '\0' ? fopen(path, "r") : NULL;
    if (f == NULL)
        return 0;
    int found = 0;
    if (fseek(f, set->offset, SEEK_SET) == 0) {
        while (!found && fgets(line, sizeof(line), f) != NULL) {
            size_t length = strlen(line);
            if (length == 0 || line[length - 1] != '\n')
                break; /* a line still being written: read it next time */
            set->offset += (long)length;
            char *rest = trim(line);
            char *uuid = strsep(&rest, "|"), *type = strsep(&rest, "|"), *value = rest;
            if (type == NULL || value == NULL)
                continue;
            unsigned long long event_type = strtoull(type, NULL, 0);
            for (unsigned int i = 0; i < gpu_count; i++) {
                if (!gpus[i].uuid_na && strcmp(gpus[i].uuid, trim(uuid)) == 0 && (set->registered[i] & event_type)) {
                    data->device = &gpus[i];
                    data->eventType = event_type;
                    data->eventData = strtoull(value, NULL, 0);
                    data->gpuInstanceId = 0xFFFFFFFFu;
                    data->computeInstanceId = 0xFFFFFFFFu;
                    found = 1;
                    break;
                }
            }
        }
    }
    fclose(f);
    return found;
}

static long now_ms(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return now.tv_sec * 1000L + now.tv_nsec / 1000000L;
}

/* Block up to `ms` until a file beside the config changes (an event appended, the hang switch
 * made): in the kernel, as the driver blocks, so a waiting watcher costs no CPU. Without a
 * config, or when inotify fails, it sleeps in steps of EVENT_POLL_MS instead. */
static void wait_for_change(long ms)
{
    char dir[4096];
    beside_config(dir, sizeof(dir), "");
    char *slash = strrchr(dir, '/');
    int fd = -1;
    if (slash != NULL) {
        *slash = '\0';
        fd = inotify_init1(IN_CLOEXEC);
    }
    if (fd < 0 || inotify_add_watch(fd, *dir ? dir : "/", IN_MODIFY | IN_CREATE | IN_MOVED_TO) < 0) {
        if (fd >= 0)
            close(fd);
        sleep_ms(ms < EVENT_POLL_MS ? ms : EVENT_POLL_MS);
        return;
    }
    struct pollfd changed = {fd, POLLIN, 0};
    poll(&changed, 1, (int)ms);
    close(fd);
}

nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeout_ms)
{
    if (set == NULL || data == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    long deadline = now_ms() + (long)timeout_ms;
    for (;;) {
        nvmlReturn_t ret = enter();
        if (ret != NVML_SUCCESS)
            return ret;
        int found = events_file_size() > set->offset && next_event_locked(set, data);
        leave(NVML_SUCCESS);
        if (found)
            return NVML_SUCCESS;
        long left = deadline - now_ms();
        if (left <= 0)
            return NVML_ERROR_TIMEOUT;
        wait_for_change(left);
    }
}

nvmlReturn_t nvmlEventSetWait(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeout_ms)
{
    return nvmlEventSetWait_v2(set, data, timeout_ms);
}

nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set)
{
    nvmlReturn_t ret = enter();
    if (ret != NVML_SUCCESS)
        return ret;
    free(set);
    return leave(NVML_SUCCESS);
}

/* The CPUs of the GPU's numa node, as a bitmask of cpuSetSize 64-bit words. */
nvmlReturn_t nvmlDeviceGetCpuAffinity(nvmlDevice_t device, unsigned int cpuSetSize, unsigned long long *cpuSet)
{
    nvmlReturn_t ret = enter_device(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (cpuSet == NULL || cpuSetSize == 0)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    if (affinity_na)
        return leave(NVML_ERROR_NOT_SUPPORTED);
    memset(cpuSet, 0, cpuSetSize * sizeof(*cpuSet));
    if (device->numa >= 0 && device->numa < MAX_NUMA)
        for (unsigned int w = 0; w < cpuSetSize && w < MAX_CPUS / MASK_BITS; w++)
            cpuSet[w] = numa_cpu_mask[device->numa][w];
    return leave(NVML_SUCCESS);
}

/* The GPU's numa node alone, as a bitmask of nodeSetSize 64-bit words (any scope). */
nvmlReturn_t nvmlDeviceGetMemoryAffinity(nvmlDevice_t device, unsigned int nodeSetSize, unsigned long long *nodeSet,
                                         unsigned int scope)
{
    (void)scope;
    nvmlReturn_t ret = enter_device(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (nodeSet == NULL || nodeSetSize == 0)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    if (affinity_na)
        return leave(NVML_ERROR_NOT_SUPPORTED);
    memset(nodeSet, 0, nodeSetSize * sizeof(*nodeSet));
    if (device->numa >= 0 && (unsigned int)device->numa < nodeSetSize * MASK_BITS)
        nodeSet[device->numa / MASK_BITS] |= 1ULL << (device->numa % MASK_BITS);
    return leave(NVML_SUCCESS);
}
