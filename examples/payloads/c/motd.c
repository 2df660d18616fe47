/*
 * A payload written in C instead of WAT: writes a terminal's message of
 * the day, naming how many packages its inventory holds.
 *
 * Envelope arguments: the file to write (a path the envelope grants with
 * write-files), then the lines to put first. Capabilities: read-inventory,
 * write-files, log. Exit code 0 when written; 64 for bad arguments, 70
 * when the inventory cannot be read, 73 when the file cannot be written.
 *
 * Built with Debian's clang for wasm32-wasi and wasi-libc (see ./build).
 * A payload calls only the host functions below: the agent refuses a
 * module that imports anything else (WASI's files and clocks included),
 * so use the C library for memory and strings, not for input and output.
 */
#include <string.h>

#define TENET(name) __attribute__((import_module("tenet"), import_name(name)))
TENET("arg_count") int tenet_arg_count(void);
TENET("arg") int tenet_arg(int index, char *buf, int len);
TENET("log") void tenet_log(const char *text, int len);
TENET("read_inventory") int tenet_read_inventory(char *buf, int len);
TENET("write_file")
int tenet_write_file(const char *path, int path_len, const char *data, int data_len);

static char inventory[1 << 20];
static char text[8192];
static char path[1024];

static void say(const char *line) { tenet_log(line, (int)strlen(line)); }

/* Append `s` (`n` bytes) to `text` at `*at`; 0 when it does not fit. */
static int append(int *at, const char *s, int n) {
    if (n < 0 || *at + n > (int)sizeof text) return 0;
    memcpy(text + *at, s, (size_t)n);
    *at += n;
    return 1;
}

static int append_number(int *at, int value) {
    char digits[12];
    int n = 0;
    do {
        digits[sizeof digits - 1 - n++] = (char)('0' + value % 10);
        value /= 10;
    } while (value > 0 && n < (int)sizeof digits);
    return append(at, digits + sizeof digits - n, n);
}

/* How often `needle` occurs in the first `len` bytes of `haystack`. */
static int occurrences(const char *haystack, int len, const char *needle) {
    int found = 0, n = (int)strlen(needle);
    for (int i = 0; i + n <= len; i++)
        if (memcmp(haystack + i, needle, (size_t)n) == 0) found++;
    return found;
}

__attribute__((export_name("run"))) int run(void) {
    int args = tenet_arg_count();
    if (args < 1) return 64;
    int path_len = tenet_arg(0, path, (int)sizeof path);
    if (path_len < 2 || path_len > (int)sizeof path) return 64;

    int at = 0;
    for (int i = 1; i < args; i++) {
        int room = (int)sizeof text - at;
        int n = tenet_arg(i, text + at, room);
        if (n < 0 || n >= room) return 64;
        at += n;
        text[at++] = '\n';
    }

    int len = tenet_read_inventory(inventory, (int)sizeof inventory);
    if (len < 0 || len > (int)sizeof inventory) {
        say("cannot read the inventory");
        return 70;
    }
    /* The inventory is JSON; each package has one "manager" field. */
    int packages = occurrences(inventory, len, "\"manager\":");
    const char *managed = " packages installed; this terminal is kept in its declared state by Tenet.\n";
    if (!append_number(&at, packages) || !append(&at, managed, (int)strlen(managed))) return 64;

    if (tenet_write_file(path, path_len, text, at) < 0) {
        say("cannot write the message of the day");
        return 73;
    }
    say("wrote the message of the day");
    return 0;
}
