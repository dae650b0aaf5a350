/*
 * stream_load: the load side of the streaming benchmark (scripts/bench.py), in one program.
 *
 *   stream_load serve --port P [--host 127.0.0.1] [--chunks 100] [--interval 0.02]
 *   stream_load run --url http://127.0.0.1:P/v1/chat/completions [--streams 1000]
 *       [--token T] [--chunks 100] [--interval 0.02] [--window W] [--timeout 120]
 *       [--model gpt-4o-mini]
 *
 * serve is a fake OpenAI upstream. POST /v1/chat/completions with "stream": true gets CHUNKS
 * server-sent events, INTERVAL seconds apart, then `data: [DONE]`, in chunked transfer
 * encoding. Each event carries "x_sent_at", the sender's clock (CLOCK_REALTIME, the clock of
 * Python's time.time()) read just before the write. Requests without "stream": true get one
 * canned chat.completion. Two optional body fields let a load client hold many streams open
 * before any chunk flows: "x_start_at" (a time.time() value: the head goes out at once, the
 * first chunk not before then) and "x_phase" (0..1: how far into the first interval this
 * stream's chunks are offset, so a thousand streams do not send in lockstep). With
 * "stream_options": {"include_usage": true} a usage event precedes [DONE], as the OpenAI
 * API sends it.
 *
 * run holds many such streams open at once, one connection each, and takes
 * `receive time - x_sent_at` for every chunk: the delay it picked up between upstream and
 * caller, the proxy's share plus the load side's own. All streams are opened during an
 * opening window and ask the upstream to start sending when the window closes, so they
 * really are open at the same time. It prints one JSON object on stdout (print_summary).
 *
 * bench.py compiles this file into its work directory, starts `serve` as the upstream of the
 * proxies it measures and runs `run` once per path and load, both pinned to the load core,
 * while the proxy under test has a core of its own. At 1,000 streams each side handles
 * 50,000 chunks/s, and the load side has to do that with most of its core to spare: if it
 * queues, its own queueing is what the delays measure. Hence C, one epoll loop per process,
 * one system call per chunk written or read, and nothing allocated per chunk.
 *
 * Build: cc -O2 -std=gnu11 -Wall -Wextra -o stream_load stream_load.c -lm
 */

#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENTS 512
#define MAX_HEAD 65536             /* bytes of a request or response head */
#define MAX_BODY (16 << 20)        /* bytes of a request body */
#define ERROR_SAMPLE 300           /* bytes of an error body kept as a sample */
#define TIMER_ID UINT64_MAX        /* epoll data of the timerfd */
#define LISTENER_ID (UINT64_MAX - 1)

/* ---------------------------------------------------------------------------------------
 * Small helpers: errors, clocks, growable buffers, timers, sockets
 * ------------------------------------------------------------------------------------- */

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("stream_load: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static double clock_seconds(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Wall-clock time, the same value as Python's time.time(): both sides stamp with it. */
static double now_real(void) { return clock_seconds(CLOCK_REALTIME); }

static double now_mono(void) { return clock_seconds(CLOCK_MONOTONIC); }

static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

static void *xrealloc(void *p, size_t size)
{
    p = realloc(p, size ? size : 1);
    if (!p)
        die("out of memory");
    return p;
}

struct buf {
    char *data;
    size_t len, cap;
};

static void buf_reserve(struct buf *b, size_t extra)
{
    if (b->len + extra <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra)
        cap *= 2;
    b->data = xrealloc(b->data, cap);
    b->cap = cap;
}

static void buf_add(struct buf *b, const void *data, size_t len)
{
    buf_reserve(b, len);
    memcpy(b->data + b->len, data, len);
    b->len += len;
}

static void buf_adds(struct buf *b, const char *text) { buf_add(b, text, strlen(text)); }

static void buf_addf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void buf_addf(struct buf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int need = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    buf_reserve(b, (size_t)need + 1);
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)need + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)need;
}

/* Drop the first n bytes (written or parsed); what follows moves to the front. */
static void buf_consume(struct buf *b, size_t n)
{
    memmove(b->data, b->data + n, b->len - n);
    b->len -= n;
}

static void buf_free(struct buf *b)
{
    free(b->data);
    *b = (struct buf){0};
}

/* A growable array of doubles: 100,000 delays must not cost 100,000 allocations. */
struct dvec {
    double *v;
    size_t n, cap;
};

static void dvec_push(struct dvec *d, double x)
{
    if (d->n == d->cap) {
        d->cap = d->cap ? d->cap * 2 : 4096;
        d->v = xrealloc(d->v, d->cap * sizeof *d->v);
    }
    d->v[d->n++] = x;
}

static int compare_doubles(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/*
 * Both modes wake through one timerfd on CLOCK_REALTIME, armed at an absolute time: its
 * resolution is the kernel's (microseconds), where epoll_wait's timeout counts whole
 * milliseconds and would make every wake-up up to a millisecond late.
 */
static int timer_new(void)
{
    int fd = timerfd_create(CLOCK_REALTIME, TFD_NONBLOCK | TFD_CLOEXEC);
    if (fd < 0)
        die("timerfd_create: %s", strerror(errno));
    return fd;
}

static void timer_set(int fd, double at)
{
    struct itimerspec its = {0};
    double seconds = floor(at);
    its.it_value.tv_sec = (time_t)seconds;
    its.it_value.tv_nsec = (long)((at - seconds) * 1e9);
    if (its.it_value.tv_sec <= 0)  /* a zero it_value would disarm the timer instead */
        its.it_value = (struct timespec){.tv_sec = 0, .tv_nsec = 1};
    if (timerfd_settime(fd, TFD_TIMER_ABSTIME, &its, NULL) < 0)
        die("timerfd_settime: %s", strerror(errno));
}

static void timer_clear(int fd)
{
    uint64_t expirations;
    while (read(fd, &expirations, sizeof expirations) < 0 && errno == EINTR)
        ;
}

static int epoll_watch(int ep, int op, int fd, uint32_t events, uint64_t id)
{
    struct epoll_event ev = {.events = events, .data.u64 = id};
    return epoll_ctl(ep, op, fd, &ev);
}

/* A thousand streams need a thousand sockets on each side; the soft limit is often 1,024. */
static rlim_t raise_nofile_limit(void)
{
    struct rlimit limit;
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0) {
        limit.rlim_cur = limit.rlim_max;
        setrlimit(RLIMIT_NOFILE, &limit);
        getrlimit(RLIMIT_NOFILE, &limit);
    }
    return limit.rlim_cur;
}

/* Small writes go out at once, as asyncio's transports do; Nagle would hold them back. */
static void set_nodelay(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* send() without SIGPIPE; the bytes sent (0 when the socket is full) or -1 on an error. */
static ssize_t send_some(int fd, const char *data, size_t len)
{
    for (;;) {
        ssize_t sent = send(fd, data, len, MSG_NOSIGNAL);
        if (sent >= 0)
            return sent;
        if (errno == EINTR)
            continue;
        return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1;
    }
}

static const char *errno_name(int err)
{
    switch (err) {
    case ECONNREFUSED: return "ECONNREFUSED";
    case ECONNRESET: return "ECONNRESET";
    case ECONNABORTED: return "ECONNABORTED";
    case EPIPE: return "EPIPE";
    case ETIMEDOUT: return "ETIMEDOUT";
    case EHOSTUNREACH: return "EHOSTUNREACH";
    case ENETUNREACH: return "ENETUNREACH";
    case EADDRNOTAVAIL: return "EADDRNOTAVAIL";
    case EMFILE: return "EMFILE";
    case ENFILE: return "ENFILE";
    case ENOBUFS: return "ENOBUFS";
    case ENOMEM: return "ENOMEM";
    default: return "OSError";
    }
}

static int is_blank(char c) { return c == ' ' || c == '\t'; }

/* [start, end) without blanks around it. */
static void trim(const char **start, const char **end)
{
    while (*start < *end && is_blank(**start))
        (*start)++;
    while (*end > *start && is_blank((*end)[-1]))
        (*end)--;
}

static int span_is(const char *start, const char *end, const char *word)
{
    size_t len = strlen(word);
    return (size_t)(end - start) == len && strncasecmp(start, word, len) == 0;
}

/* Whether a comma-separated header value (Connection, Transfer-Encoding) lists a token. */
static int has_token(const char *start, const char *end, const char *token)
{
    while (start < end) {
        const char *comma = memchr(start, ',', (size_t)(end - start));
        const char *stop = comma ? comma : end, *a = start, *b = stop;
        trim(&a, &b);
        if (span_is(a, b, token))
            return 1;
        start = stop + 1;
    }
    return 0;
}

/* A decimal number that fills [p, p + len) (blanks around it allowed). */
static int parse_double(const char *p, size_t len, double *out)
{
    char small[64], *text = len < sizeof small ? small : xrealloc(NULL, len + 1), *end;
    memcpy(text, p, len);
    text[len] = '\0';
    *out = strtod(text, &end);
    int ok = end != text;
    while (isspace((unsigned char)*end))
        end++;
    ok = ok && *end == '\0';
    if (text != small)
        free(text);
    return ok;
}

/* The next line of a head: returns where the line after it starts (NULL if it has not
 * all arrived) and sets *eol to the line's end, before its CRLF or bare LF. */
static const char *next_line(const char *p, const char *end, const char **eol)
{
    const char *nl = memchr(p, '\n', (size_t)(end - p));
    if (!nl)
        return NULL;
    *eol = nl > p && nl[-1] == '\r' ? nl - 1 : nl;
    return nl + 1;
}

/* One "Name: value" header line; 0 if it is not one (folded lines are not). */
static int split_header(const char *p, const char *eol, const char **name_end,
                        const char **value, const char **value_end)
{
    const char *colon = memchr(p, ':', (size_t)(eol - p));
    if (!colon || colon == p || is_blank(*p) || is_blank(colon[-1]))
        return 0;
    *name_end = colon;
    *value = colon + 1;
    *value_end = eol;
    trim(value, value_end);
    return 1;
}

/* A Content-Length value: digits only. */
static int parse_length(const char *p, const char *end, long long *out)
{
    long long value = 0;
    if (p == end)
        return 0;
    for (; p < end; p++) {
        if (!isdigit((unsigned char)*p) || value > (LLONG_MAX - 9) / 10)
            return 0;
        value = value * 10 + (*p - '0');
    }
    *out = value;
    return 1;
}

/* ---------------------------------------------------------------------------------------
 * JSON out: strings escaped and floats formatted as Python's json.dumps writes them
 * ------------------------------------------------------------------------------------- */

/* One UTF-8 character; U+FFFD for a byte that does not start a valid one. */
static size_t utf8_decode(const unsigned char *s, size_t n, uint32_t *cp)
{
    uint32_t value, least;
    size_t len;
    if (s[0] < 0x80) {
        *cp = s[0];
        return 1;
    }
    if (s[0] >= 0xc2 && s[0] <= 0xdf)
        len = 2, value = s[0] & 0x1f, least = 0x80;
    else if (s[0] >= 0xe0 && s[0] <= 0xef)
        len = 3, value = s[0] & 0x0f, least = 0x800;
    else if (s[0] >= 0xf0 && s[0] <= 0xf4)
        len = 4, value = s[0] & 0x07, least = 0x10000;
    else
        len = 0, value = least = 0;
    for (size_t i = 1; len && i < len; i++) {
        if (i >= n || (s[i] & 0xc0) != 0x80)
            len = 0;
        else
            value = value << 6 | (s[i] & 0x3f);
    }
    if (!len || value < least || value > 0x10ffff || (value >= 0xd800 && value <= 0xdfff)) {
        *cp = 0xfffd;
        return 1;
    }
    *cp = value;
    return len;
}

/* A JSON string, ASCII only (\uXXXX for the rest), as json.dumps writes it. */
static void json_add_string(struct buf *b, const char *s, size_t n)
{
    buf_add(b, "\"", 1);
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        i += utf8_decode((const unsigned char *)s + i, n - i, &cp);
        switch (cp) {
        case '"': buf_adds(b, "\\\""); break;
        case '\\': buf_adds(b, "\\\\"); break;
        case '\n': buf_adds(b, "\\n"); break;
        case '\r': buf_adds(b, "\\r"); break;
        case '\t': buf_adds(b, "\\t"); break;
        case '\b': buf_adds(b, "\\b"); break;
        case '\f': buf_adds(b, "\\f"); break;
        default:
            if (cp >= 0x20 && cp < 0x80) {
                char c = (char)cp;
                buf_add(b, &c, 1);
            } else if (cp < 0x10000) {
                buf_addf(b, "\\u%04x", (unsigned)cp);
            } else {
                cp -= 0x10000;
                buf_addf(b, "\\u%04x\\u%04x", 0xd800 | (unsigned)(cp >> 10),
                         0xdc00 | (unsigned)(cp & 0x3ff));
            }
        }
    }
    buf_add(b, "\"", 1);
}

/*
 * A float as Python's repr() writes it: the fewest digits that read back as the same
 * double, positional from 1e-4 up to 1e16 (with ".0" when integral), exponent otherwise.
 */
static void json_add_float(struct buf *b, double x)
{
    if (isnan(x) || isinf(x)) {
        buf_adds(b, isnan(x) ? "NaN" : x > 0 ? "Infinity" : "-Infinity");
        return;
    }
    char sci[40], digits[24];
    for (int precision = 0; precision <= 16; precision++) {
        snprintf(sci, sizeof sci, "%.*e", precision, x);
        if (strtod(sci, NULL) == x)
            break;
    }
    const char *p = sci;
    int count = 0;
    if (*p == '-') {
        buf_add(b, "-", 1);
        p++;
    }
    for (; *p != 'e'; p++)
        if (*p != '.')
            digits[count++] = *p;
    int exponent = atoi(p + 1);
    while (count > 1 && digits[count - 1] == '0')
        count--;
    if (exponent < -4 || exponent >= 16) {
        buf_add(b, digits, 1);
        if (count > 1) {
            buf_add(b, ".", 1);
            buf_add(b, digits + 1, (size_t)count - 1);
        }
        buf_addf(b, "e%c%02d", exponent < 0 ? '-' : '+', abs(exponent));
    } else if (exponent < 0) {
        buf_adds(b, "0.");
        for (int i = -1; i > exponent; i--)
            buf_add(b, "0", 1);
        buf_add(b, digits, (size_t)count);
    } else {
        for (int i = 0; i <= exponent; i++)
            buf_add(b, i < count ? &digits[i] : "0", 1);
        buf_add(b, ".", 1);
        if (count > exponent + 1)
            buf_add(b, digits + exponent + 1, (size_t)(count - exponent - 1));
        else
            buf_add(b, "0", 1);
    }
}

/* Python's round(x, ndigits): correctly rounded, ties to even, as printf rounds. */
static double py_round(double x, int ndigits)
{
    char text[400];
    snprintf(text, sizeof text, "%.*f", ndigits, x);
    return strtod(text, NULL);
}

/* ---------------------------------------------------------------------------------------
 * JSON in: a validating scanner for request bodies, which a proxy may have re-serialised
 * (other spacing, other key order); it reads the few top-level fields the upstream needs.
 * ------------------------------------------------------------------------------------- */

enum jtype { J_NULL, J_FALSE, J_TRUE, J_NUMBER, J_STRING, J_ARRAY, J_OBJECT };

struct jval {
    enum jtype type;
    const char *start, *end;  /* the value's text, quotes and brackets included */
};

#define JSON_MAX_DEPTH 1000

static const char *json_value(const char *p, const char *end, int depth, struct jval *v);

static const char *json_ws(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    c = (char)tolower((unsigned char)c);
    return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* p at the opening quote; returns the end of the string, NULL if malformed. */
static const char *json_string(const char *p, const char *end)
{
    for (p++; p < end; p++) {
        unsigned char c = (unsigned char)*p;
        if (c == '"')
            return p + 1;
        if (c < 0x20)
            return NULL;  /* control characters must be escaped */
        if (c != '\\')
            continue;
        if (++p >= end)
            return NULL;
        if (*p == 'u') {
            for (int i = 1; i <= 4; i++)
                if (p + i >= end || hex_value(p[i]) < 0)
                    return NULL;
            p += 4;
        } else if (!*p || !strchr("\"\\/bfnrt", *p)) {
            return NULL;
        }
    }
    return NULL;
}

static const char *json_digits(const char *p, const char *end)
{
    if (p >= end || !isdigit((unsigned char)*p))
        return NULL;
    while (p < end && isdigit((unsigned char)*p))
        p++;
    return p;
}

static const char *json_literal(const char *p, const char *end, const char *word)
{
    size_t len = strlen(word);
    return (size_t)(end - p) >= len && memcmp(p, word, len) == 0 ? p + len : NULL;
}

/* Python's json also takes NaN, Infinity and -Infinity. */
static const char *json_number(const char *p, const char *end)
{
    if (p < end && *p == '-')
        p++;
    if (p < end && *p == 'I')
        return json_literal(p, end, "Infinity");
    if (p < end && *p == '0')
        p++;
    else if (!(p = json_digits(p, end)))
        return NULL;
    if (p < end && *p == '.' && !(p = json_digits(p + 1, end)))
        return NULL;
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-'))
            p++;
        p = json_digits(p, end);
    }
    return p;
}

/* The members of an object or the items of an array; p at the opening bracket. */
static const char *json_container(const char *p, const char *end, int depth, char close)
{
    struct jval ignored;
    p = json_ws(p + 1, end);
    if (p < end && *p == close)
        return p + 1;
    for (;;) {
        if (close == '}') {
            if (p >= end || *p != '"' || !(p = json_string(p, end)))
                return NULL;
            p = json_ws(p, end);
            if (p >= end || *p != ':')
                return NULL;
            p = json_ws(p + 1, end);
        }
        if (!(p = json_value(p, end, depth + 1, &ignored)))
            return NULL;
        p = json_ws(p, end);
        if (p < end && *p == ',')
            p = json_ws(p + 1, end);
        else if (p < end && *p == close)
            return p + 1;
        else
            return NULL;
    }
}

static const char *json_value(const char *p, const char *end, int depth, struct jval *v)
{
    if (p >= end || depth > JSON_MAX_DEPTH)
        return NULL;
    v->start = p;
    switch (*p) {
    case '{': v->type = J_OBJECT; p = json_container(p, end, depth, '}'); break;
    case '[': v->type = J_ARRAY; p = json_container(p, end, depth, ']'); break;
    case '"': v->type = J_STRING; p = json_string(p, end); break;
    case 't': v->type = J_TRUE; p = json_literal(p, end, "true"); break;
    case 'f': v->type = J_FALSE; p = json_literal(p, end, "false"); break;
    case 'n': v->type = J_NULL; p = json_literal(p, end, "null"); break;
    case 'N': v->type = J_NUMBER; p = json_literal(p, end, "NaN"); break;
    default: v->type = J_NUMBER; p = json_number(p, end); break;
    }
    v->end = p;
    return p;
}

/* Whether a body is one JSON object (whitespace around allowed); NULL if so, else why not. */
static const char *json_parse_object(const char *p, size_t len, struct jval *object)
{
    const char *end = p + len, *after = json_value(json_ws(p, end), end, 0, object);
    if (!after || json_ws(after, end) != end)
        return "not well-formed JSON";
    return object->type == J_OBJECT ? NULL : "the body is not a JSON object";
}

/* Whether a JSON string (quotes included) spells `key`, escapes decoded. */
static int json_key_is(const char *p, const char *end, const char *key)
{
    static const char escapes[] = "b\bf\fn\nr\rt\t";
    for (p++, end--; p < end; key++) {
        unsigned c = (unsigned char)*p++;
        if (c == '\\') {
            c = (unsigned char)*p++;
            if (c == 'u') {
                c = 0;
                for (int i = 0; i < 4; i++)
                    c = c << 4 | (unsigned)hex_value(*p++);
            } else {
                const char *found = strchr(escapes, (int)c);
                if (found && (found - escapes) % 2 == 0)
                    c = (unsigned char)found[1];
            }
        }
        if (!*key || c != (unsigned char)*key)
            return 0;
    }
    return !*key;
}

/* The last member named `key` of a well-formed object, as json.loads keeps the last. */
static int json_member(const struct jval *object, const char *key, struct jval *out)
{
    const char *end = object->end, *p = json_ws(object->start + 1, end);
    int found = 0;
    while (p < end && *p == '"') {
        const char *name = p;
        p = json_string(p, end);
        int match = json_key_is(name, p, key);
        struct jval value;
        p = json_value(json_ws(json_ws(p, end) + 1, end), end, 0, &value);
        if (match) {
            *out = value;
            found = 1;
        }
        p = json_ws(p, end);
        if (p < end && *p == ',')
            p = json_ws(p + 1, end);
    }
    return found;
}

/* Python's truth value of the decoded JSON value. */
static int json_truthy(const struct jval *v)
{
    double number;
    switch (v->type) {
    case J_TRUE: return 1;
    case J_NUMBER: return !parse_double(v->start, (size_t)(v->end - v->start), &number) ||
                          number != 0;
    case J_STRING: return v->end - v->start > 2;
    case J_ARRAY:
    case J_OBJECT: return *json_ws(v->start + 1, v->end) != (v->type == J_ARRAY ? ']' : '}');
    default: return 0;
    }
}

/* Python's float() of the decoded value; 0 where float() would raise. */
static int json_float(const struct jval *v, double *out)
{
    switch (v->type) {
    case J_NUMBER: return parse_double(v->start, (size_t)(v->end - v->start), out);
    case J_TRUE: *out = 1; return 1;
    case J_FALSE: *out = 0; return 1;
    case J_STRING:
        if (memchr(v->start, '\\', (size_t)(v->end - v->start)))
            return 0;
        return parse_double(v->start + 1, (size_t)(v->end - v->start - 2), out);
    default: return 0;
    }
}

/* ---------------------------------------------------------------------------------------
 * serve: the upstream stand-in
 * ------------------------------------------------------------------------------------- */

#define TICK 0.001  /* seconds between the scheduler's wake-ups while chunks are due */
#define CHAT_PATH "/v1/chat/completions"
#define CHUNK_HEAD                                                                          \
    "data: {\"id\": \"chatcmpl-bench\", \"object\": \"chat.completion.chunk\", "           \
    "\"created\": 1700000000, \"model\": \"gpt-4o-mini\", "
#define USAGE                                                                               \
    "\"usage\": {\"prompt_tokens\": 12, \"completion_tokens\": 100, \"total_tokens\": 112}}"

/* What json.dumps writes for the canned answers of scripts' earlier Python upstream. */
static const char COMPLETION[] =
    "{\"id\": \"chatcmpl-bench\", \"object\": \"chat.completion\", \"created\": 1700000000, "
    "\"model\": \"gpt-4o-mini\", \"choices\": [{\"index\": 0, \"message\": {\"role\": "
    "\"assistant\", \"content\": \"Hello from the stream upstream.\"}, \"finish_reason\": "
    "\"stop\"}], " USAGE;
static const char USAGE_EVENT[] = CHUNK_HEAD "\"choices\": [], " USAGE "\n\n";
static const char STREAM_HEAD[] = "HTTP/1.1 200 OK\r\n"
                                  "Content-Type: text/event-stream\r\n"
                                  "Cache-Control: no-cache\r\n"
                                  "Transfer-Encoding: chunked\r\n";
static const char LAST_CHUNK[] = "0\r\n\r\n";

struct conn {
    int open;          /* this slot (indexed by fd) holds a live connection */
    int closing;       /* close once the output is written; nothing more is answered */
    int eof;           /* the client sent all it will */
    uint32_t events;   /* what epoll watches: EPOLLIN until eof, EPOLLOUT while `out` waits */
    int streaming;     /* a streamed answer is in progress: later requests wait in `in` */
    int keep_alive;    /* of the request being answered */
    int include_usage; /* the current stream ends with the usage event */
    int sent;          /* chunks of the current stream written */
    uint32_t gen;      /* bumped when a stream starts or the connection goes: see struct due */
    struct buf in, out;
};

/* One stream's next chunk. `gen` tells whether the stream is still the connection's: an
 * entry whose connection closed (or was reused for another) is dropped when it comes due. */
struct due {
    double at;
    uint64_t order;  /* breaks ties in due time, first come first served */
    int fd;
    uint32_t gen;
};

static struct server {
    int ep, listener, timer;
    int chunks;
    double interval;
    struct buf *prefixes;  /* every event up to its timestamp, built once */
    struct buf ending, usage_ending;  /* what follows the last chunk, without and with usage */
    struct conn *conns;    /* indexed by fd; grows only when a connection is accepted */
    size_t nconns;
    struct due *heap;      /* every stream's next chunk, earliest first */
    size_t heap_len, heap_cap;
    uint64_t order;
    int armed;             /* the timer is set, for armed_at */
    double armed_at;
    struct buf scratch;    /* one chunk being built */
} srv;

static void conn_answer_pending(struct conn *c);

/* -- the scheduler: one heap of due times, one timer ------------------------------------- */

static int due_before(const struct due *a, const struct due *b)
{
    return a->at < b->at || (a->at == b->at && a->order < b->order);
}

static void heap_push(struct due item)
{
    if (srv.heap_len == srv.heap_cap) {
        srv.heap_cap = srv.heap_cap ? srv.heap_cap * 2 : 1024;
        srv.heap = xrealloc(srv.heap, srv.heap_cap * sizeof *srv.heap);
    }
    size_t i = srv.heap_len++;
    while (i > 0 && due_before(&item, &srv.heap[(i - 1) / 2])) {
        srv.heap[i] = srv.heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    srv.heap[i] = item;
}

static struct due heap_pop(void)
{
    struct due top = srv.heap[0], last = srv.heap[--srv.heap_len];
    size_t i = 0, n = srv.heap_len;
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= n)
            break;
        if (child + 1 < n && due_before(&srv.heap[child + 1], &srv.heap[child]))
            child++;
        if (!due_before(&srv.heap[child], &last))
            break;
        srv.heap[i] = srv.heap[child];
        i = child;
    }
    if (n)
        srv.heap[i] = last;
    return top;
}

/*
 * Wake for the earliest due chunk, but not sooner than a tick from now. A wake-up per
 * chunk would cost a timer and a loop turn for every one of 50,000 chunks a second; a
 * tick writes all chunks then due (some fifty at 1,000 streams). Chunks go out up to a
 * tick late, which the measurement does not see: each is stamped when it is written.
 */
static void sched_arm(void)
{
    if (!srv.heap_len)
        return;
    double wake_at = fmax(srv.heap[0].at, now_real() + TICK);
    if (srv.armed && srv.armed_at <= wake_at)
        return;
    timer_set(srv.timer, wake_at);
    srv.armed = 1;
    srv.armed_at = wake_at;
}

static void sched_add(struct conn *c, double first_at)
{
    int fd = (int)(c - srv.conns);
    heap_push((struct due){.at = first_at, .order = srv.order++, .fd = fd, .gen = c->gen});
    sched_arm();
}

/* -- connections: buffered output, closing ----------------------------------------------- */

static void conn_watch(struct conn *c)
{
    uint32_t events = (c->eof ? 0 : EPOLLIN) | (c->out.len ? EPOLLOUT : 0);
    if (c->events == events)
        return;
    c->events = events;
    epoll_watch(srv.ep, EPOLL_CTL_MOD, (int)(c - srv.conns), events, (uint64_t)(c - srv.conns));
}

static void conn_close(struct conn *c)
{
    if (!c->open)
        return;
    close((int)(c - srv.conns));  /* also leaves the epoll set */
    c->open = 0;
    c->gen++;
    buf_free(&c->in);
    buf_free(&c->out);
}

/* Close once everything written so far is out, as asyncio's transport.close() does. */
static void conn_end(struct conn *c)
{
    if (!c->open || c->closing)
        return;
    c->closing = 1;
    c->streaming = 0;
    c->gen++;  /* a stream in progress is dropped */
    if (!c->out.len)
        conn_close(c);
}

/* Write now what the socket takes; keep the rest, in order, for EPOLLOUT. */
static void conn_send(struct conn *c, const char *data, size_t len)
{
    if (!c->open || c->closing)
        return;
    if (!c->out.len) {
        ssize_t sent = send_some((int)(c - srv.conns), data, len);
        if (sent < 0) {
            conn_close(c);  /* the client is gone; its stream is dropped */
            return;
        }
        data += sent;
        len -= (size_t)sent;
        if (!len)
            return;
    }
    buf_add(&c->out, data, len);
    conn_watch(c);
}

static void conn_flush(struct conn *c)
{
    while (c->out.len) {
        ssize_t sent = send_some((int)(c - srv.conns), c->out.data, c->out.len);
        if (sent < 0) {
            conn_close(c);
            return;
        }
        if (!sent)
            return;
        buf_consume(&c->out, (size_t)sent);
    }
    conn_watch(c);
    if (c->closing)
        conn_close(c);
}

/* -- answers ------------------------------------------------------------------------------ */

/* The blank line ending a head, after "Connection: close" if the client asked for it. */
static const char *end_of_head(int keep_alive)
{
    return keep_alive ? "\r\n" : "Connection: close\r\n\r\n";
}

static void send_whole(struct conn *c, const char *status, const char *payload, size_t len,
                       int keep_alive)
{
    struct buf *b = &srv.scratch;
    b->len = 0;
    buf_addf(b, "HTTP/1.1 %s\r\nContent-Type: application/json; charset=utf-8\r\n"
                "Content-Length: %zu\r\n%s", status, len, end_of_head(keep_alive));
    buf_add(b, payload, len);
    conn_send(c, b->data, b->len);
}

static void send_error(struct conn *c, const char *status, const char *message, int keep_alive)
{
    struct buf body = {0};
    buf_adds(&body, "{\"error\": {\"message\": ");
    json_add_string(&body, message, strlen(message));
    buf_adds(&body, ", \"type\": \"invalid_request_error\"}}");
    send_whole(c, status, body.data, body.len, keep_alive);
    buf_free(&body);
}

/* Add one piece of a chunked body to a buffer. */
static void add_chunk(struct buf *b, const char *data, size_t len)
{
    buf_addf(b, "%zx\r\n", len);
    buf_add(b, data, len);
    buf_add(b, "\r\n", 2);
}

/* Write the stream's next chunk, stamped now; 0 once the stream is over. */
static int stream_send_next(struct conn *c)
{
    struct buf *b = &srv.scratch, *prefix = &srv.prefixes[c->sent];
    char stamp[64];
    int stamp_len = snprintf(stamp, sizeof stamp, "%.6f}\n\n", now_real());
    b->len = 0;
    buf_addf(b, "%zx\r\n", prefix->len + (size_t)stamp_len);
    buf_add(b, prefix->data, prefix->len);
    buf_add(b, stamp, (size_t)stamp_len);
    buf_add(b, "\r\n", 2);
    if (++c->sent < srv.chunks) {
        conn_send(c, b->data, b->len);
        return 1;
    }
    struct buf *ending = c->include_usage ? &srv.usage_ending : &srv.ending;
    buf_add(b, ending->data, ending->len);
    conn_send(c, b->data, b->len);
    c->streaming = 0;
    /* The answer is written whole: close, or take the next pipelined request. */
    if (!c->keep_alive)
        conn_end(c);
    else
        conn_answer_pending(c);
    return 0;
}

/* The timer fired: write every chunk that is due. */
static void sched_send_due(void)
{
    srv.armed = 0;
    double now = now_real();
    while (srv.heap_len && srv.heap[0].at <= now) {
        /* Popped before sending: a stream that ends may start the connection's next one. */
        struct due item = heap_pop();
        struct conn *c = &srv.conns[item.fd];
        if (!c->open || c->gen != item.gen)
            continue;  /* the client went away mid-stream */
        if (stream_send_next(c)) {
            item.at += srv.interval;  /* counted from the schedule, not from now: no drift */
            heap_push(item);
        }
    }
    sched_arm();
}

/* What a stream request asks for; 0 if a field has a type Python's float() or .get()
 * would have choked on. */
static int stream_options(const struct jval *body, double *first_at, int *include_usage)
{
    struct jval v;
    double start_at = now_real(), phase = 0;
    if (json_member(body, "x_start_at", &v) && json_truthy(&v) && !json_float(&v, &start_at))
        return 0;
    if (json_member(body, "x_phase", &v) && !json_float(&v, &phase))
        return 0;
    *include_usage = 0;
    if (json_member(body, "stream_options", &v) && json_truthy(&v)) {
        struct jval flag;
        if (v.type != J_OBJECT)
            return 0;
        *include_usage = json_member(&v, "include_usage", &flag) && json_truthy(&flag);
    }
    *first_at = start_at + phase * srv.interval;
    return 1;
}

static void start_stream(struct conn *c, const struct jval *body)
{
    double first_at;
    int include_usage;
    if (!stream_options(body, &first_at, &include_usage)) {
        send_error(c, "400 Bad Request",
                   "bad request: x_start_at, x_phase or stream_options has the wrong type", 0);
        conn_end(c);
        return;
    }
    struct buf *b = &srv.scratch;
    b->len = 0;
    buf_adds(b, STREAM_HEAD);
    buf_adds(b, end_of_head(c->keep_alive));
    conn_send(c, b->data, b->len);
    if (!c->open || c->closing)
        return;
    c->include_usage = include_usage;
    c->sent = 0;
    c->gen++;
    if (srv.chunks > 0) {
        c->streaming = 1;
        sched_add(c, first_at);
    } else {
        struct buf *ending = include_usage ? &srv.usage_ending : &srv.ending;
        conn_send(c, ending->data, ending->len);
    }
}

struct request {
    const char *method, *target, *body;
    size_t method_len, target_len, body_len;
    size_t size;        /* bytes of input the request took, head and body */
    int keep_alive;
    const char *error;  /* why it could not be parsed */
};

enum { PARSE_MORE, PARSE_OK, PARSE_BAD };

static void answer(struct conn *c, const struct request *req)
{
    const char *query = memchr(req->target, '?', req->target_len);  /* ignored */
    size_t path_len = query ? (size_t)(query - req->target) : req->target_len;
    if (path_len != strlen(CHAT_PATH) || memcmp(req->target, CHAT_PATH, path_len) != 0) {
        send_error(c, "404 Not Found", "no such endpoint", c->keep_alive);
        return;
    }
    if (req->method_len != 4 || memcmp(req->method, "POST", 4) != 0) {
        send_error(c, "405 Method Not Allowed", "POST only", c->keep_alive);
        return;
    }
    struct jval body, stream;
    const char *why = json_parse_object(req->body, req->body_len, &body);
    if (why) {
        /* The OpenAI API answers a body it cannot parse with 400, not a server error. */
        char message[128];
        snprintf(message, sizeof message, "invalid JSON body: %s", why);
        send_error(c, "400 Bad Request", message, c->keep_alive);
        return;
    }
    if (!json_member(&body, "stream", &stream) || !json_truthy(&stream)) {
        send_whole(c, "200 OK", COMPLETION, strlen(COMPLETION), c->keep_alive);
        return;
    }
    start_stream(c, &body);
}

static int parse_bad(struct request *req, const char *why)
{
    req->error = why;
    return PARSE_BAD;
}

/* "METHOD target HTTP/1.x"; the minor version, or -1 if the line is not one. */
static int parse_request_line(const char *p, const char *eol, struct request *req)
{
    const char *sp1 = memchr(p, ' ', (size_t)(eol - p));
    const char *sp2 = sp1 ? memchr(sp1 + 1, ' ', (size_t)(eol - sp1 - 1)) : NULL;
    if (!sp2 || sp1 == p || sp2 == sp1 + 1)
        return -1;
    if (eol - sp2 != 9 || memcmp(sp2 + 1, "HTTP/1.", 7) != 0 || !isdigit((unsigned char)sp2[8]))
        return -1;
    req->method = p;
    req->method_len = (size_t)(sp1 - p);
    req->target = sp1 + 1;
    req->target_len = (size_t)(sp2 - sp1 - 1);
    return sp2[8] - '0';
}

/* The request at the start of the input: PARSE_MORE until it has all arrived. */
static int parse_request(const char *data, size_t len, struct request *req)
{
    const char *p = data, *end = data + len, *eol, *next, *name_end, *value, *value_end;
    long long length = 0;
    int has_length = 0, says_close = 0, says_keep = 0;
    memset(req, 0, sizeof *req);
    while ((next = next_line(p, end, &eol)) && eol == p)
        p = next;  /* empty lines before a request line are allowed (RFC 9112, 2.2) */
    if (!next)
        return len > MAX_HEAD ? parse_bad(req, "head too large") : PARSE_MORE;
    int minor = parse_request_line(p, eol, req);
    if (minor < 0)
        return parse_bad(req, "invalid request line");
    for (p = next; (next = next_line(p, end, &eol)) && eol != p; p = next) {
        if (!split_header(p, eol, &name_end, &value, &value_end))
            return parse_bad(req, "invalid header line");
        if (span_is(p, name_end, "content-length")) {
            long long this_length;
            if (!parse_length(value, value_end, &this_length) ||
                (has_length && this_length != length))
                return parse_bad(req, "invalid Content-Length");
            length = this_length;
            has_length = 1;
        } else if (span_is(p, name_end, "transfer-encoding")) {
            return parse_bad(req, "request bodies must come with Content-Length");
        } else if (span_is(p, name_end, "connection")) {
            says_close |= has_token(value, value_end, "close");
            says_keep |= has_token(value, value_end, "keep-alive");
        }
    }
    if (!next)
        return len > MAX_HEAD ? parse_bad(req, "head too large") : PARSE_MORE;
    if (length > MAX_BODY)
        return parse_bad(req, "body too large");
    size_t head = (size_t)(next - data);
    if (len - head < (size_t)length)
        return PARSE_MORE;
    req->body = next;
    req->body_len = (size_t)length;
    req->size = head + (size_t)length;
    /* HTTP/1.1 keeps the connection unless told otherwise; HTTP/1.0 only when told to. */
    req->keep_alive = minor >= 1 ? !says_close : says_keep && !says_close;
    return PARSE_OK;
}

/* Answer the requests waiting in the input, in order, until a stream holds the rest. */
static void conn_answer_pending(struct conn *c)
{
    while (c->open && !c->closing && !c->streaming && c->in.len) {
        struct request req;
        int result = parse_request(c->in.data, c->in.len, &req);
        if (result == PARSE_MORE)
            return;
        if (result == PARSE_BAD) {
            char message[128];
            snprintf(message, sizeof message, "bad request: %s", req.error);
            send_error(c, "400 Bad Request", message, 0);
            conn_end(c);
            return;
        }
        c->keep_alive = req.keep_alive;
        answer(c, &req);
        if (!c->open || c->closing)
            return;
        buf_consume(&c->in, req.size);
        if (!c->streaming && !c->keep_alive)
            conn_end(c);
    }
}

static void conn_read(struct conn *c)
{
    buf_reserve(&c->in, 4096);
    ssize_t got = recv((int)(c - srv.conns), c->in.data + c->in.len, c->in.cap - c->in.len, 0);
    if (got < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            conn_close(c);
        return;
    }
    if (got == 0) {
        /* The client sent all it will: as asyncio does, finish what is written and close. */
        c->eof = 1;
        conn_end(c);
        if (c->open)
            conn_watch(c);  /* the socket stays readable at its end: stop asking */
        return;
    }
    if (c->closing)
        return;  /* read only so that closing does not reset the connection */
    c->in.len += (size_t)got;
    if (c->in.len > MAX_HEAD + MAX_BODY) {
        conn_close(c);
        return;
    }
    if (!c->streaming)
        conn_answer_pending(c);
}

static void conn_event(int fd, uint32_t events)
{
    struct conn *c = &srv.conns[fd];
    if (!c->open)
        return;
    if (events & (EPOLLERR | EPOLLHUP)) {
        conn_close(c);  /* reset, or shut both ways: nothing more can be written */
        return;
    }
    if (events & EPOLLIN)
        conn_read(c);
    if (c->open && (events & EPOLLOUT))
        conn_flush(c);
}

/* The table entry of a new connection's fd, grown to hold it. */
static struct conn *conn_slot(int fd)
{
    if ((size_t)fd >= srv.nconns) {
        size_t count = srv.nconns ? srv.nconns : 1024;
        while (count <= (size_t)fd)
            count *= 2;
        srv.conns = xrealloc(srv.conns, count * sizeof *srv.conns);
        memset(srv.conns + srv.nconns, 0, (count - srv.nconns) * sizeof *srv.conns);
        srv.nconns = count;
    }
    return &srv.conns[fd];
}

static void accept_all(void)
{
    static int warned;
    for (;;) {
        int fd = accept4(srv.listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK && !warned++)
                fprintf(stderr, "stream_load: accept: %s\n", strerror(errno));
            return;
        }
        struct conn *c = conn_slot(fd);
        *c = (struct conn){.open = 1, .keep_alive = 1, .events = EPOLLIN, .gen = c->gen + 1};
        set_nodelay(fd);
        if (epoll_watch(srv.ep, EPOLL_CTL_ADD, fd, EPOLLIN, (uint64_t)fd) < 0)
            conn_close(c);
    }
}

/* Every event up to its timestamp, and what follows the last one, built once. */
static void build_answers(void)
{
    srv.prefixes = xrealloc(NULL, (size_t)(srv.chunks > 0 ? srv.chunks : 1) * sizeof(struct buf));
    for (int i = 0; i < srv.chunks; i++) {
        const char *delta = i == 0 ? "{\"role\": \"assistant\", \"content\": \"\"}"
                                   : "{\"content\": \"tok \"}";
        const char *finish = i == srv.chunks - 1 ? "\"stop\"" : "null";
        srv.prefixes[i] = (struct buf){0};
        /* The closing brace comes with the stamp: x_sent_at is the last member. */
        buf_addf(&srv.prefixes[i],
                 CHUNK_HEAD "\"choices\": [{\"index\": 0, \"delta\": %s, \"finish_reason\": %s}]"
                            ", \"x_sent_at\": ", delta, finish);
    }
    static const char done[] = "data: [DONE]\n\n";
    add_chunk(&srv.ending, done, strlen(done));
    buf_adds(&srv.ending, LAST_CHUNK);
    add_chunk(&srv.usage_ending, USAGE_EVENT, strlen(USAGE_EVENT));
    buf_add(&srv.usage_ending, srv.ending.data, srv.ending.len);
}

static int listen_on(const char *host, int port)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    struct addrinfo *found;
    char service[16];
    snprintf(service, sizeof service, "%d", port);
    int status = getaddrinfo(host, service, &hints, &found);
    if (status)
        die("cannot resolve %s: %s", host, gai_strerror(status));
    int fd = -1, err = 0;
    for (struct addrinfo *a = found; a && fd < 0; a = a->ai_next) {
        int one = 1;
        fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0)
            continue;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, a->ai_addr, a->ai_addrlen) < 0 || listen(fd, 4096) < 0) {
            err = errno;
            close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(found);
    if (fd < 0)
        die("cannot listen on %s:%d: %s", host, port, strerror(err));
    return fd;
}

struct options {
    const char *host, *url, *token, *model;
    int port, streams, chunks;
    double interval, window, timeout;
    int has_window;
};

static int serve(const struct options *opt)
{
    raise_nofile_limit();
    srv.chunks = opt->chunks;
    srv.interval = opt->interval;
    build_answers();
    srv.listener = listen_on(opt->host, opt->port);
    srv.ep = epoll_create1(EPOLL_CLOEXEC);
    srv.timer = timer_new();
    if (srv.ep < 0 || epoll_watch(srv.ep, EPOLL_CTL_ADD, srv.listener, EPOLLIN, LISTENER_ID) ||
        epoll_watch(srv.ep, EPOLL_CTL_ADD, srv.timer, EPOLLIN, TIMER_ID))
        die("epoll: %s", strerror(errno));
    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(srv.ep, events, MAX_EVENTS, -1);
        if (n < 0 && errno != EINTR)
            die("epoll_wait: %s", strerror(errno));
        for (int i = 0; i < n; i++) {
            uint64_t id = events[i].data.u64;
            if (id == LISTENER_ID) {
                accept_all();
            } else if (id == TIMER_ID) {
                timer_clear(srv.timer);
                sched_send_due();
            } else {
                conn_event((int)id, events[i].events);
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------
 * run: the stream client
 * ------------------------------------------------------------------------------------- */

#define LAG_TICK 0.01  /* seconds: the loop-lag probe's timer */

enum phase { S_WAITING, S_CONNECTING, S_OPEN, S_FINISHED };
enum body_kind { BODY_NONE, BODY_LENGTH, BODY_CHUNKED, BODY_UNTIL_CLOSE };
enum dechunk_state {
    DC_SIZE, DC_EXTENSION, DC_SIZE_LF, DC_DATA, DC_DATA_CR, DC_DATA_LF,
    DC_TRAILER, DC_TRAILER_LINE, DC_END_LF
};

struct stream {
    int fd;
    enum phase phase;
    uint32_t events;          /* what epoll watches */
    struct buf request;       /* until it is sent */
    size_t request_sent;
    struct buf head;          /* the response head, until it is complete */
    int status;               /* 0 until the head is complete */
    int framed;               /* a length or chunks, not the connection's end, ends the body */
    enum body_kind body;
    long long remaining;      /* Content-Length bytes still to come */
    enum dechunk_state dc;
    unsigned long long chunk_left;
    int size_digits;
    struct buf pending;       /* an event's start whose line end has not arrived yet */
    char error_body[ERROR_SAMPLE];
    size_t error_len;
    long chunks;              /* timestamps seen */
    int done;                 /* data: [DONE] seen */
    double first, received;   /* receive times: of the first timestamp, of the latest read */
};

struct error_kind {
    char *name, *sample;
    long count;
};

static struct client {
    const struct options *opt;
    struct sockaddr_storage addr;
    socklen_t addr_len;
    struct buf path, netloc;
    int ep, timer;
    double armed_at;
    struct stream *streams;
    int opened, finished;
    double start_at, open_from, spacing, deadline;
    double lag_due, lag_before;  /* realtime due, monotonic start of the current probe */
    int cpu_noted;
    double cpu_at_start, last_received;
    long completed, open_late;
    struct dvec delays, lengths, loop_lag;
    struct error_kind *kinds;
    size_t nkinds;
    char read_buf[1 << 16];
} cli;

static void tally_error(const char *kind, const char *sample, size_t sample_len)
{
    for (size_t i = 0; i < cli.nkinds; i++) {
        if (strcmp(cli.kinds[i].name, kind) == 0) {
            cli.kinds[i].count++;
            return;
        }
    }
    if (sample_len > ERROR_SAMPLE)
        sample_len = ERROR_SAMPLE;
    cli.kinds = xrealloc(cli.kinds, (cli.nkinds + 1) * sizeof *cli.kinds);
    cli.kinds[cli.nkinds++] = (struct error_kind){.name = strdup(kind),
                                                  .sample = strndup(sample, sample_len),
                                                  .count = 1};
}

/* The verdict on a stream once its answer or its connection ended (kind: how it failed). */
static void judge(struct stream *s, const char *kind, const char *sample)
{
    char name[32], text[64];
    if (kind) {
        tally_error(kind, sample, strlen(sample));
    } else if (s->status != 200) {
        snprintf(name, sizeof name, "status %d", s->status);
        tally_error(name, s->error_body, s->error_len);
    } else if (!s->done) {
        snprintf(text, sizeof text, "after %ld chunks", s->chunks);
        tally_error("missing [DONE]", text, strlen(text));
    } else if (s->chunks < cli.opt->chunks) {
        snprintf(text, sizeof text, "%ld of %d", s->chunks, cli.opt->chunks);
        tally_error("fewer chunks than expected", text, strlen(text));
    } else {
        cli.completed++;
    }
}

/*
 * The stream is over: judge it and stop watching it, but keep its connection open until
 * every stream is done, as a pooling client would. A thousand connections closed as their
 * streams end would crowd a thousand closes (here and in the proxy) into the last chunk
 * interval and hold up the last chunks of the streams still running.
 */
static void stream_finish(struct stream *s, const char *kind, const char *sample)
{
    if (s->phase == S_FINISHED)
        return;
    s->phase = S_FINISHED;
    if (s->fd >= 0)
        epoll_ctl(cli.ep, EPOLL_CTL_DEL, s->fd, NULL);
    buf_free(&s->request);
    buf_free(&s->head);
    buf_free(&s->pending);
    judge(s, kind, sample);
    cli.finished++;
}

static void stream_fail_errno(struct stream *s, int err)
{
    char sample[160];
    snprintf(sample, sizeof sample, "[Errno %d] %s", err, strerror(err));
    stream_finish(s, errno_name(err), sample);
}

/* A line of the answer is `data: [DONE]` (blanks and a CR allowed around the marker). */
static int is_done_line(const char *p, const char *end)
{
    if (end - p < 5 || memcmp(p, "data:", 5) != 0)
        return 0;
    for (p += 5; p < end && is_blank(*p); p++)
        ;
    if (end - p < 6 || memcmp(p, "[DONE]", 6) != 0)
        return 0;
    for (p += 6; p < end && is_blank(*p); p++)
        ;
    if (p < end && *p == '\r')
        p++;
    return p == end;
}

static int has_done_line(const char *p, size_t len)
{
    const char *end = p + len, *at = p;
    while ((at = memmem(at, (size_t)(end - at), "[DONE]", 6))) {
        const char *start = memrchr(p, '\n', (size_t)(at - p)), *stop = memchr(at, '\n', (size_t)(end - at));
        if (is_done_line(start ? start + 1 : p, stop ? stop : end))
            return 1;
        at += 6;
    }
    return 0;
}

static int is_py_space(char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }

/*
 * Record the delay of every timestamped event in whole lines; note [DONE]. A proxy may
 * re-serialise events (other spacing, other key order), so no fixed layout is assumed:
 * every `"x_sent_at":`, blanks, then digits and dots, counts.
 */
static void scan_lines(struct stream *s, const char *p, size_t len)
{
    static const char key[] = "\"x_sent_at\":";
    const char *end = p + len, *at = p;
    while ((at = memmem(at, (size_t)(end - at), key, sizeof key - 1))) {
        at += sizeof key - 1;
        while (at < end && is_py_space(*at))
            at++;
        const char *number = at;
        while (at < end && (isdigit((unsigned char)*at) || *at == '.'))
            at++;
        double stamp;
        if (at == number || !parse_double(number, (size_t)(at - number), &stamp))
            continue;
        if (!s->chunks)
            s->first = s->received;
        s->chunks++;
        dvec_push(&cli.delays, s->received - stamp);
    }
    if (!s->done && has_done_line(p, len)) {
        s->done = 1;
        /* First chunk to [DONE]: longer than nominal means someone fell behind the pace. */
        dvec_push(&cli.lengths, s->received - s->first);
    }
}

/* Body text of a 200 answer: scan whole lines only, so that a timestamp split over two
 * reads (or two HTTP chunks) is never read half; the rest waits for its line end. */
static void on_body(struct stream *s, const char *p, size_t len)
{
    if (s->status != 200) {
        size_t room = ERROR_SAMPLE - s->error_len;
        memcpy(s->error_body + s->error_len, p, len < room ? len : room);
        s->error_len += len < room ? len : room;
        return;
    }
    if (s->pending.len) {
        buf_add(&s->pending, p, len);
        const char *nl = memrchr(s->pending.data, '\n', s->pending.len);
        if (nl) {
            size_t end = (size_t)(nl - s->pending.data) + 1;
            scan_lines(s, s->pending.data, end);
            buf_consume(&s->pending, end);
        }
        return;
    }
    const char *nl = memrchr(p, '\n', len);
    size_t end = nl ? (size_t)(nl - p) + 1 : 0;
    if (end)
        scan_lines(s, p, end);
    buf_add(&s->pending, p + end, len - end);
}

static void on_message_complete(struct stream *s)
{
    if (s->pending.len)
        scan_lines(s, s->pending.data, s->pending.len);
    stream_finish(s, NULL, NULL);
}

static void dechunk_size_done(struct stream *s)
{
    s->dc = s->chunk_left ? DC_DATA : DC_TRAILER;
    s->size_digits = 0;
}

/* One step of the chunked-body decoder on the byte at p; returns how many bytes it took
 * (DC_DATA takes a run), 0 when the body is complete, -1 when it is malformed. */
static long dechunk_step(struct stream *s, const char *p, const char *end)
{
    int digit = hex_value(*p);
    switch (s->dc) {
    case DC_SIZE:
        if (digit >= 0 && s->chunk_left < (1ULL << 56)) {
            s->chunk_left = s->chunk_left * 16 + (unsigned)digit;
            s->size_digits++;
        } else if (!s->size_digits || digit >= 0) {
            return -1;
        } else if (*p == ';' || is_blank(*p)) {
            s->dc = DC_EXTENSION;
        } else if (*p == '\r') {
            s->dc = DC_SIZE_LF;
        } else if (*p == '\n') {
            dechunk_size_done(s);
        } else {
            return -1;
        }
        return 1;
    case DC_EXTENSION:  /* chunk extensions are skipped */
        if (*p == '\r')
            s->dc = DC_SIZE_LF;
        else if (*p == '\n')
            dechunk_size_done(s);
        return 1;
    case DC_SIZE_LF:
        if (*p != '\n')
            return -1;
        dechunk_size_done(s);
        return 1;
    case DC_DATA: {
        size_t take = (size_t)(end - p) < s->chunk_left ? (size_t)(end - p) : s->chunk_left;
        on_body(s, p, take);
        s->chunk_left -= take;
        if (!s->chunk_left)
            s->dc = DC_DATA_CR;
        return (long)take;
    }
    case DC_DATA_CR:
        if (*p != '\r' && *p != '\n')
            return -1;
        s->dc = *p == '\r' ? DC_DATA_LF : DC_SIZE;
        return 1;
    case DC_DATA_LF:
        if (*p != '\n')
            return -1;
        s->dc = DC_SIZE;
        return 1;
    case DC_TRAILER:  /* trailer lines, until an empty one */
        if (*p == '\n')
            return 0;
        s->dc = *p == '\r' ? DC_END_LF : DC_TRAILER_LINE;
        return 1;
    case DC_TRAILER_LINE:
        if (*p == '\n')
            s->dc = DC_TRAILER;
        return 1;
    case DC_END_LF:
        return *p == '\n' ? 0 : -1;
    }
    return -1;
}

static void dechunk(struct stream *s, const char *p, size_t len)
{
    const char *end = p + len;
    while (p < end && s->phase == S_OPEN) {
        long took = dechunk_step(s, p, end);
        if (took < 0) {
            stream_finish(s, "bad response", "malformed chunked body");
            return;
        }
        if (took == 0) {
            on_message_complete(s);
            return;
        }
        p += took;
    }
}

static void body_feed(struct stream *s, const char *p, size_t len)
{
    switch (s->body) {
    case BODY_LENGTH: {
        size_t take = (long long)len < s->remaining ? len : (size_t)s->remaining;
        on_body(s, p, take);
        s->remaining -= (long long)take;
        if (!s->remaining)
            on_message_complete(s);
        break;
    }
    case BODY_CHUNKED: dechunk(s, p, len); break;
    case BODY_UNTIL_CLOSE: on_body(s, p, len); break;
    case BODY_NONE: break;
    }
}

/* Status line and headers: how the body is framed. 0 if the head is not HTTP/1.x. */
static int parse_head(struct stream *s, const char *p, const char *end)
{
    const char *eol = p, *next = next_line(p, end, &eol), *name_end, *value, *value_end;
    if (!next || eol - p < 12 || memcmp(p, "HTTP/1.", 7) != 0 || !isdigit((unsigned char)p[7]) ||
        p[8] != ' ')
        return 0;
    for (int i = 9; i < 12; i++)
        if (!isdigit((unsigned char)p[i]))
            return 0;
    int status = atoi(p + 9), has_length = 0, chunked = 0, has_encoding = 0;
    long long length = 0;
    for (p = next; (next = next_line(p, end, &eol)) && eol != p; p = next) {
        if (!split_header(p, eol, &name_end, &value, &value_end))
            return 0;
        if (span_is(p, name_end, "content-length")) {
            if (!parse_length(value, value_end, &length))
                return 0;
            has_length = 1;
        } else if (span_is(p, name_end, "transfer-encoding")) {
            has_encoding = 1;
            chunked = has_token(value, value_end, "chunked");
        }
    }
    s->status = status;
    s->framed = has_length || has_encoding;
    if (status / 100 == 1 || status == 204 || status == 304 || (has_length && !chunked && !length))
        s->body = BODY_NONE;
    else if (chunked)
        s->body = BODY_CHUNKED;
    else if (has_length)
        s->body = BODY_LENGTH;
    else
        s->body = BODY_UNTIL_CLOSE;
    s->remaining = length;
    return 1;
}

/* Where a head ends (after its blank line) in p[0, len), looking from `from`; 0 if not yet. */
static size_t head_end(const char *p, size_t len, size_t from)
{
    for (const char *nl = p + from; (nl = memchr(nl, '\n', (size_t)(p + len - nl))); nl++) {
        size_t i = (size_t)(nl - p);
        if (i + 1 < len && p[i + 1] == '\n')
            return i + 2;
        if (i + 2 < len && p[i + 1] == '\r' && p[i + 2] == '\n')
            return i + 3;
    }
    return 0;
}

/* Take in the head; returns how many of the bytes belonged to it (all while incomplete). */
static size_t head_feed(struct stream *s, const char *p, size_t len)
{
    size_t before = s->head.len;
    buf_add(&s->head, p, len);
    size_t end = head_end(s->head.data, s->head.len, before >= 2 ? before - 2 : 0);
    if (!end) {
        if (s->head.len > MAX_HEAD)
            stream_finish(s, "bad response", "head too large");
        return len;
    }
    if (!parse_head(s, s->head.data, s->head.data + end)) {
        stream_finish(s, "bad response", "not an HTTP/1.x response head");
        return len;
    }
    buf_free(&s->head);
    if (s->received > cli.start_at)
        cli.open_late++;  /* the head came after chunks were due: the opening ran late */
    if (s->body == BODY_NONE)
        on_message_complete(s);
    return end - before;
}

static void stream_feed(struct stream *s, const char *p, size_t len)
{
    if (!s->status) {
        size_t used = head_feed(s, p, len);
        p += used;
        len -= used;
    }
    if (s->phase == S_OPEN && len)
        body_feed(s, p, len);
}

/* The connection ended (err 0: closed by the peer) before the answer was complete. */
static void stream_lost(struct stream *s, int err)
{
    char sample[64];
    if (s->status && !s->framed) {
        on_message_complete(s);  /* a body without length or chunks ends with the connection */
    } else if (err) {
        stream_fail_errno(s, err);
    } else if (s->status) {
        snprintf(sample, sizeof sample, "after %ld chunks", s->chunks);
        stream_finish(s, "connection closed mid-answer", sample);
    } else {
        stream_finish(s, "connection closed before the answer", "");
    }
}

static void stream_read(struct stream *s)
{
    ssize_t got = recv(s->fd, cli.read_buf, sizeof cli.read_buf, 0);
    if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;
    if (got <= 0) {
        stream_lost(s, got < 0 ? errno : 0);
        return;
    }
    /* The receive time, read once per read() as the chunks in it arrived together. */
    s->received = cli.last_received = now_real();
    stream_feed(s, cli.read_buf, (size_t)got);
}

static void stream_watch(struct stream *s, uint32_t events)
{
    if (s->events != events && epoll_watch(cli.ep, EPOLL_CTL_MOD, s->fd, events,
                                           (uint64_t)(s - cli.streams)) == 0)
        s->events = events;
}

static void stream_send_request(struct stream *s)
{
    while (s->request_sent < s->request.len) {
        ssize_t sent = send_some(s->fd, s->request.data + s->request_sent,
                                 s->request.len - s->request_sent);
        if (sent < 0) {
            stream_lost(s, errno);
            return;
        }
        if (!sent) {
            stream_watch(s, EPOLLIN | EPOLLOUT);
            return;
        }
        s->request_sent += (size_t)sent;
    }
    buf_free(&s->request);
    stream_watch(s, EPOLLIN);
}

static void stream_connected(struct stream *s)
{
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        err = errno;
    if (err) {
        close(s->fd);  /* a failed connect leaves nothing to keep open */
        s->fd = -1;
        stream_fail_errno(s, err);
        return;
    }
    s->phase = S_OPEN;
    stream_send_request(s);
}

static void stream_event(struct stream *s, uint32_t events)
{
    if (s->phase == S_CONNECTING) {
        stream_connected(s);
        return;
    }
    if (s->phase == S_OPEN && (events & (EPOLLIN | EPOLLHUP | EPOLLERR)))
        stream_read(s);
    if (s->phase == S_OPEN && (events & EPOLLOUT))
        stream_send_request(s);
}

/* The whole HTTP/1.1 request for stream `index`, head and JSON body, as json.dumps and the
 * earlier Python client wrote them. */
static void build_request(struct buf *out, int index)
{
    const struct options *opt = cli.opt;
    struct buf body = {0};
    buf_adds(&body, "{\"model\": ");
    json_add_string(&body, opt->model, strlen(opt->model));
    buf_adds(&body, ", \"stream\": true, \"messages\": [{\"role\": \"user\", \"content\": "
                    "\"Count to one hundred.\"}], \"x_start_at\": ");
    json_add_float(&body, cli.start_at);
    buf_adds(&body, ", \"x_phase\": ");
    json_add_float(&body, (double)index / opt->streams);
    buf_adds(&body, "}");
    buf_addf(out, "POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                  "Content-Length: %zu\r\n", cli.path.data, cli.netloc.data, body.len);
    if (*opt->token)
        buf_addf(out, "Authorization: Bearer %s\r\n", opt->token);
    buf_adds(out, "\r\n");
    buf_add(out, body.data, body.len);
    buf_free(&body);
}

/* Open stream `index`: build its request and start a non-blocking connect. */
static void stream_open(int index)
{
    struct stream *s = &cli.streams[index];
    build_request(&s->request, index);
    s->phase = S_CONNECTING;
    s->fd = socket(cli.addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s->fd < 0) {
        stream_fail_errno(s, errno);
        return;
    }
    set_nodelay(s->fd);
    /* EINPROGRESS (or EINTR, after which the connect goes on): EPOLLOUT tells its end. */
    if ((connect(s->fd, (struct sockaddr *)&cli.addr, cli.addr_len) < 0 &&
         errno != EINPROGRESS && errno != EINTR) ||
        epoll_watch(cli.ep, EPOLL_CTL_ADD, s->fd, EPOLLOUT, (uint64_t)index) < 0) {
        int err = errno;
        close(s->fd);
        s->fd = -1;
        stream_fail_errno(s, err);
        return;
    }
    s->events = EPOLLOUT;
}

/* Open the streams evenly over the first half of the opening window. */
static void open_due_streams(double now)
{
    int streams = cli.opt->streams;
    while (cli.opened < streams && cli.open_from + cli.opened * cli.spacing <= now)
        stream_open(cli.opened++);
    if (cli.opened == streams && !cli.deadline)
        cli.deadline = now + fmax(1.0, cli.start_at + cli.opt->timeout - now);
}

/* How late this client's own loop wakes up for a 10 ms timer: a lower bound of the
 * delay it adds to every chunk. Timed on the monotonic clock, which does not jump. */
static void note_loop_lag(double now)
{
    double mono = now_mono();
    dvec_push(&cli.loop_lag, mono - cli.lag_before - LAG_TICK);
    cli.lag_before = mono;
    cli.lag_due = now + LAG_TICK;
}

static void run_timers(double now)
{
    if (now >= cli.lag_due)
        note_loop_lag(now);
    if (!cli.cpu_noted && now >= cli.start_at) {
        /* CPU is shared out over the sending phase only; opening the streams costs less. */
        cli.cpu_at_start = cpu_seconds();
        cli.cpu_noted = 1;
    }
    open_due_streams(now);
}

static void arm_next_timer(void)
{
    double next = cli.lag_due;
    if (cli.opened < cli.opt->streams)
        next = fmin(next, cli.open_from + cli.opened * cli.spacing);
    if (!cli.cpu_noted)
        next = fmin(next, cli.start_at);
    if (cli.deadline)
        next = fmin(next, cli.deadline);
    if (next != cli.armed_at) {
        timer_set(cli.timer, next);
        cli.armed_at = next;
    }
}

static void run_loop(void)
{
    struct epoll_event events[MAX_EVENTS];
    int streams = cli.opt->streams;
    while (cli.opened < streams || cli.finished < streams) {
        arm_next_timer();
        int n = epoll_wait(cli.ep, events, MAX_EVENTS, -1);
        if (n < 0 && errno != EINTR)
            die("epoll_wait: %s", strerror(errno));
        for (int i = 0; i < n; i++) {
            if (events[i].data.u64 == TIMER_ID)
                timer_clear(cli.timer);
            else
                stream_event(&cli.streams[events[i].data.u64], events[i].events);
        }
        double now = now_real();
        run_timers(now);
        if (cli.deadline && now >= cli.deadline)
            break;
    }
}

/* Streams still running at the deadline time out; then every connection closes. */
static void close_all(void)
{
    char sample[64];
    snprintf(sample, sizeof sample, "still open %g s after the start", cli.opt->timeout);
    for (int i = 0; i < cli.opt->streams; i++) {
        struct stream *s = &cli.streams[i];
        if (s->phase != S_FINISHED)
            tally_error("timed out", sample, strlen(sample));
        if (s->fd >= 0)
            close(s->fd);
    }
}

static void add_key(struct buf *b, const char *key)
{
    json_add_string(b, key, strlen(key));
    buf_adds(b, ": ");
}

/* Percentiles in ms: sorted, index min(last, int(share * n)), rounded to 3 decimals. */
static void add_percentiles(struct buf *b, struct dvec *d, const char *const names[],
                            const double shares[], int count)
{
    if (d->n)
        qsort(d->v, d->n, sizeof *d->v, compare_doubles);
    buf_adds(b, "{");
    for (int i = 0; i < count; i++) {
        buf_adds(b, i ? ", " : "");
        add_key(b, names[i]);
        size_t index = (size_t)(shares[i] * (double)d->n);
        if (!d->n)
            buf_adds(b, "null");
        else
            json_add_float(b, py_round(d->v[index < d->n - 1 ? index : d->n - 1] * 1000, 3));
    }
    buf_adds(b, "}");
}

static void add_error_kinds(struct buf *b, int samples)
{
    buf_adds(b, "{");
    for (size_t i = 0; i < cli.nkinds; i++) {
        buf_adds(b, i ? ", " : "");
        add_key(b, cli.kinds[i].name);
        if (samples)
            json_add_string(b, cli.kinds[i].sample, strlen(cli.kinds[i].sample));
        else
            buf_addf(b, "%ld", cli.kinds[i].count);
    }
    buf_adds(b, "}");
}

/* One JSON object, the keys and figures the harness reads (bench.py, run_streams). */
static void print_summary(double cpu)
{
    static const char *const delay_names[] = {"p50", "p90", "p99", "max"};
    static const double delay_shares[] = {0.5, 0.9, 0.99, 1.0};
    static const char *const lag_names[] = {"p50", "p99", "max"};
    static const double lag_shares[] = {0.5, 0.99, 1.0};
    const struct options *opt = cli.opt;
    double sending = cli.last_received - cli.start_at;
    long errors = 0;
    for (size_t i = 0; i < cli.nkinds; i++)
        errors += cli.kinds[i].count;
    struct buf b = {0};
    buf_addf(&b, "{\"streams\": %d, \"completed\": %ld, \"errors\": %ld, \"error_kinds\": ",
             opt->streams, cli.completed, errors);
    add_error_kinds(&b, 0);
    buf_adds(&b, ", \"error_samples\": ");
    add_error_kinds(&b, 1);
    buf_addf(&b, ", \"opened_late\": %ld, \"chunks\": %zu, \"offered_chunks_per_s\": %.0f",
             cli.open_late, cli.delays.n, nearbyint(opt->streams / opt->interval));
    buf_adds(&b, ", \"achieved_chunks_per_s\": ");
    if (sending > 0)
        buf_addf(&b, "%.0f", nearbyint((double)cli.delays.n / sending));
    else
        buf_adds(&b, "null");
    buf_adds(&b, ", \"delay_ms\": ");
    add_percentiles(&b, &cli.delays, delay_names, delay_shares, 4);
    buf_adds(&b, ", \"client_loop_lag_ms\": ");
    add_percentiles(&b, &cli.loop_lag, lag_names, lag_shares, 3);
    buf_adds(&b, ", \"stream_length_p50_s\": ");
    if (cli.lengths.n) {
        qsort(cli.lengths.v, cli.lengths.n, sizeof *cli.lengths.v, compare_doubles);
        json_add_float(&b, cli.lengths.v[cli.lengths.n / 2]);
    } else {
        buf_adds(&b, "null");
    }
    /* The sending phase, as time.time() values, so others' CPU can be shared out over it. */
    buf_adds(&b, ", \"sending_from\": ");
    json_add_float(&b, cli.start_at);
    buf_adds(&b, ", \"sending_until\": ");
    json_add_float(&b, cli.last_received);
    /* Near 1.0 means this client used a whole core: its own delay then dominates. */
    buf_adds(&b, ", \"client_cpu_share\": ");
    if (sending > 0)
        json_add_float(&b, py_round(cpu / sending, 3));
    else
        buf_adds(&b, "null");
    buf_adds(&b, "}\n");
    fwrite(b.data, 1, b.len, stdout);
    fflush(stdout);
    buf_free(&b);
}

/* Split an http:// URL into what the request needs and resolve its host. */
static void parse_url(const char *url)
{
    if (strncasecmp(url, "http://", 7) != 0)
        die("--url must be a plain http:// URL");
    const char *netloc = url + 7, *rest = netloc + strcspn(netloc, "/?#");
    buf_add(&cli.netloc, netloc, (size_t)(rest - netloc));
    buf_add(&cli.netloc, "", 1);
    cli.netloc.len--;
    size_t path_len = strcspn(rest, "#");
    if (path_len && rest[path_len - 1] == '?')
        path_len--;  /* an empty query string is dropped */
    buf_add(&cli.path, path_len ? rest : "/", path_len ? path_len : 1);
    buf_add(&cli.path, "", 1);

    char host[256], service[16] = "80";
    const char *at = memrchr(netloc, '@', (size_t)(rest - netloc));
    const char *h = at ? at + 1 : netloc, *colon, *h_end = rest;
    if (*h == '[') {
        const char *bracket = memchr(h, ']', (size_t)(rest - h));
        if (!bracket)
            die("--url has a bad host: %s", url);
        colon = bracket + 1 < rest && bracket[1] == ':' ? bracket + 1 : NULL;
        h_end = bracket;
        h++;
    } else {
        colon = memrchr(h, ':', (size_t)(rest - h));
        if (colon)
            h_end = colon;
    }
    if ((size_t)(h_end - h) >= sizeof host || (colon && (size_t)(rest - colon) >= sizeof service))
        die("--url has a bad host or port: %s", url);
    snprintf(host, sizeof host, "%.*s", (int)(h_end - h), h);
    if (colon && rest - colon > 1)
        snprintf(service, sizeof service, "%.*s", (int)(rest - colon - 1), colon + 1);

    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_NUMERICSERV};
    struct addrinfo *found;
    int status = getaddrinfo(host, service, &hints, &found);
    if (status)
        die("cannot resolve %s port %s: %s", host, service, gai_strerror(status));
    memcpy(&cli.addr, found->ai_addr, found->ai_addrlen);
    cli.addr_len = found->ai_addrlen;
    freeaddrinfo(found);
}

static int run(const struct options *opt)
{
    cli.opt = opt;
    parse_url(opt->url);
    raise_nofile_limit();
    cli.streams = calloc((size_t)opt->streams, sizeof *cli.streams);
    if (!cli.streams)
        die("out of memory");
    for (int i = 0; i < opt->streams; i++)
        cli.streams[i].fd = -1;
    cli.ep = epoll_create1(EPOLL_CLOEXEC);
    cli.timer = timer_new();
    if (cli.ep < 0 || epoll_watch(cli.ep, EPOLL_CTL_ADD, cli.timer, EPOLLIN, TIMER_ID) < 0)
        die("epoll: %s", strerror(errno));

    double window = opt->has_window ? opt->window : 1.0 + opt->streams / 250.0;
    cli.start_at = now_real() + window;
    cli.lag_before = now_mono();
    cli.lag_due = now_real() + LAG_TICK;
    cli.open_from = now_real();
    cli.spacing = (cli.start_at - cli.open_from) / 2 / opt->streams;
    run_timers(now_real());  /* opens the first stream */
    run_loop();
    close_all();
    print_summary(cpu_seconds() - cli.cpu_at_start);
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * Command line
 * ------------------------------------------------------------------------------------- */

static void usage(void) __attribute__((noreturn));

static void usage(void)
{
    fputs("usage: stream_load serve --port P [--host 127.0.0.1] [--chunks 100] "
          "[--interval 0.02]\n"
          "       stream_load run --url http://HOST:PORT/PATH [--streams 1000] [--token T]\n"
          "           [--chunks 100] [--interval 0.02] [--window S] [--timeout 120]"
          " [--model M]\n",
          stderr);
    exit(2);
}

static double number_arg(const char *name, const char *text)
{
    char *end;
    double value = strtod(text, &end);
    if (end == text || *end) {
        fprintf(stderr, "stream_load: %s wants a number, not '%s'\n", name, text);
        exit(2);
    }
    return value;
}

static int integer_arg(const char *name, const char *text)
{
    double value = number_arg(name, text);
    if (value != floor(value) || value < 0 || value > INT32_MAX) {
        fprintf(stderr, "stream_load: %s wants a whole number, not '%s'\n", name, text);
        exit(2);
    }
    return (int)value;
}

/* --name value or --name=value; which names a mode takes is checked by the caller. */
static void parse_options(int argc, char **argv, struct options *opt)
{
    for (int i = 2; i < argc; i++) {
        const char *name = argv[i], *eq = strchr(name, '='), *value;
        char key[32];
        if (strncmp(name, "--", 2) != 0)
            usage();
        snprintf(key, sizeof key, "%.*s", (int)(eq ? (size_t)(eq - name) : strlen(name)), name);
        if (eq)
            value = eq + 1;
        else if (i + 1 < argc)
            value = argv[++i];
        else
            usage();
        if (!strcmp(key, "--host")) opt->host = value;
        else if (!strcmp(key, "--port")) opt->port = integer_arg(key, value);
        else if (!strcmp(key, "--url")) opt->url = value;
        else if (!strcmp(key, "--token")) opt->token = value;
        else if (!strcmp(key, "--model")) opt->model = value;
        else if (!strcmp(key, "--streams")) opt->streams = integer_arg(key, value);
        else if (!strcmp(key, "--chunks")) opt->chunks = integer_arg(key, value);
        else if (!strcmp(key, "--interval")) opt->interval = number_arg(key, value);
        else if (!strcmp(key, "--timeout")) opt->timeout = number_arg(key, value);
        else if (!strcmp(key, "--window")) opt->window = number_arg(key, value), opt->has_window = 1;
        else usage();
    }
}

int main(int argc, char **argv)
{
    struct options opt = {.host = "127.0.0.1", .token = "", .model = "gpt-4o-mini",
                          .port = -1, .streams = 1000, .chunks = 100, .interval = 0.02,
                          .timeout = 120.0};
    if (argc < 2)
        usage();
    parse_options(argc, argv, &opt);
    if (!(opt.interval > 0))
        die("--interval must be positive");
    /* A client that goes away mid-write must cost an error code, not the process. */
    signal(SIGPIPE, SIG_IGN);
    if (!strcmp(argv[1], "serve")) {
        if (opt.port < 0 || opt.port > 65535 || opt.url)
            usage();
        return serve(&opt);
    }
    if (!strcmp(argv[1], "run")) {
        if (!opt.url || opt.streams < 1 || opt.port >= 0)
            usage();
        return run(&opt);
    }
    usage();
}
