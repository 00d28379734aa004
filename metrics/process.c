/*
 * process.c - the process_* metrics, read from /proc when /metrics is scraped.
 *
 * Threads: runs as a collector on the scraping thread; it keeps no state.
 *
 * The one idea: these values belong to the kernel, not to us, so nothing is
 * recorded; each scrape reads /proc/self/stat, /proc/self/statm, /proc/self/fd,
 * /proc/stat and getrlimit() afresh. A value that cannot be read is left out of the
 * exposition rather than reported as a made-up 0.
 */
#include "metrics/metrics_internal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <unistd.h>

/* /proc/self/stat is one line of ~52 numbers and a command name of <= 16 bytes. */
#define PROCESS_STAT_BYTES 1024
/* One metric's HELP, TYPE and sample line. */
#define PROCESS_LINE_BYTES 512

/* Fields of /proc/self/stat, numbered from 1 as in proc(5). */
#define STAT_FIELD_STATE 3
#define STAT_FIELD_UTIME 14
#define STAT_FIELD_STIME 15
#define STAT_FIELD_STARTTIME 22

typedef struct {
    double cpu_seconds;
    double start_ticks; /* clock ticks after boot */
} process_stat;

/* Read a small file whole into buf (NUL-terminated). Returns 0 or -1. */
static int read_small_file(const char *path, char *buf, size_t cap)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    size_t len = 0;
    while (len < cap - 1) {
        ssize_t n = read(fd, buf + len, cap - 1 - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        len += (size_t)n;
    }
    close(fd);
    buf[len] = '\0';
    return len > 0 ? 0 : -1;
}

static int read_stat(process_stat *st)
{
    char buf[PROCESS_STAT_BYTES];
    if (read_small_file("/proc/self/stat", buf, sizeof buf) != 0)
        return -1;
    /* The command name (field 2) is in parentheses and may itself hold ") ", so
     * the fields resume after the last parenthesis. */
    char *p = strrchr(buf, ')');
    if (!p)
        return -1;
    p++;
    double ticks = (double)sysconf(_SC_CLK_TCK);
    if (ticks <= 0)
        return -1;
    unsigned long long utime = 0, stime = 0, start = 0;
    int found = 0;
    for (int field = STAT_FIELD_STATE; field <= STAT_FIELD_STARTTIME; field++) {
        while (*p == ' ')
            p++;
        if (*p == '\0')
            return -1;
        char *end = p;
        while (*end != ' ' && *end != '\0')
            end++;
        if (field == STAT_FIELD_UTIME || field == STAT_FIELD_STIME || field == STAT_FIELD_STARTTIME) {
            unsigned long long v = strtoull(p, NULL, 10);
            if (field == STAT_FIELD_UTIME)
                utime = v;
            else if (field == STAT_FIELD_STIME)
                stime = v;
            else
                start = v;
            found++;
        }
        p = end;
    }
    if (found != 3)
        return -1;
    st->cpu_seconds = (double)(utime + stime) / ticks;
    st->start_ticks = (double)start / ticks;
    return 0;
}

/* Boot time in seconds since the epoch, from the btime line of /proc/stat. The
 * file has a line per CPU and a long interrupt line, so it is read line by line. */
static int read_boot_time(double *btime)
{
    FILE *f = fopen("/proc/stat", "re");
    if (!f)
        return -1;
    char *line = NULL;
    size_t cap = 0;
    int rc = -1;
    while (getline(&line, &cap, f) > 0) {
        unsigned long long v;
        if (sscanf(line, "btime %llu", &v) == 1) {
            *btime = (double)v;
            rc = 0;
            break;
        }
    }
    free(line);
    fclose(f);
    return rc;
}

/* Virtual and resident size in bytes, from the first two fields of statm (pages). */
static int read_memory(double *virtual_bytes, double *resident_bytes)
{
    char buf[PROCESS_STAT_BYTES];
    unsigned long long size, resident;
    long page = sysconf(_SC_PAGESIZE);
    if (page <= 0 || read_small_file("/proc/self/statm", buf, sizeof buf) != 0)
        return -1;
    if (sscanf(buf, "%llu %llu", &size, &resident) != 2)
        return -1;
    *virtual_bytes = (double)size * (double)page;
    *resident_bytes = (double)resident * (double)page;
    return 0;
}

/* Entries of /proc/self/fd, less the one opendir() itself holds. */
static int count_open_fds(double *count)
{
    DIR *dir = opendir("/proc/self/fd");
    if (!dir)
        return -1;
    int own = dirfd(dir);
    unsigned long n = 0;
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL) {
        if (entry->d_name[0] == '.')
            continue;
        if (atoi(entry->d_name) == own)
            continue;
        n++;
    }
    closedir(dir);
    *count = (double)n;
    return 0;
}

static void put_metric(metrics_append_fn append, void *out, const char *name, const char *type,
                       const char *help, double value)
{
    char line[PROCESS_LINE_BYTES];
    char number[METRICS_NUMBER_BYTES];
    int n = snprintf(line, sizeof line, "# HELP %s %s\n# TYPE %s %s\n%s %s\n", name, help, name, type, name,
                     metrics_format_double(number, value));
    if (n > 0 && (size_t)n < sizeof line)
        append(out, line, (size_t)n);
}

void metrics_process_collector(void *arg, metrics_append_fn append, void *out)
{
    process_stat st;
    double btime, virtual_bytes, resident_bytes, open_fds;
    bool have_stat = read_stat(&st) == 0;
    bool have_memory = read_memory(&virtual_bytes, &resident_bytes) == 0;
    struct rlimit limit;

    /* In name order, like the families before them. */
    if (have_stat)
        put_metric(append, out, "process_cpu_seconds_total", "counter",
                   "User and system CPU time used by the process, in seconds.", st.cpu_seconds);
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0)
        put_metric(append, out, "process_max_fds", "gauge",
                   "Soft limit on open file descriptors (RLIMIT_NOFILE).",
                   limit.rlim_cur == RLIM_INFINITY ? (double)INFINITY : (double)limit.rlim_cur);
    if (count_open_fds(&open_fds) == 0)
        put_metric(append, out, "process_open_fds", "gauge", "File descriptors the process has open.",
                   open_fds);
    if (have_memory)
        put_metric(append, out, "process_resident_memory_bytes", "gauge",
                   "Resident set size of the process, in bytes.", resident_bytes);
    if (have_stat && read_boot_time(&btime) == 0)
        put_metric(append, out, "process_start_time_seconds", "gauge",
                   "When the process started, in seconds since the Unix epoch.", btime + st.start_ticks);
    if (have_memory)
        put_metric(append, out, "process_virtual_memory_bytes", "gauge",
                   "Virtual memory size of the process, in bytes.", virtual_bytes);
}
