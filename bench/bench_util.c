/* bench_util.c - see bench_util.h.
 * SPDX-License-Identifier: MIT
 */
#include "bench/bench_util.h"

#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/cm_mem.h"
#include "common/cm_status.h"
#include "common/cm_time.h"

int bu_cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double bu_median(const double *v, int n) {
    if (n <= 0) return 0.0;
    double *s = cm_malloc((size_t)n * sizeof *s);
    memcpy(s, v, (size_t)n * sizeof *v);
    qsort(s, (size_t)n, sizeof *s, bu_cmp_double);
    double m = n % 2 ? s[n / 2] : 0.5 * (s[n / 2 - 1] + s[n / 2]);
    free(s);
    return m;
}

int bu_reap_by(pid_t *pid, int *status, double until) {
    for (;;) {
        if (*pid <= 0) return 1;
        pid_t r = waitpid(*pid, status, WNOHANG);
        if (r == *pid || (r < 0 && errno != EINTR)) {
            *pid = 0;
            return 1;
        }
        if (cm_now() >= until) return 0;
        usleep(1000);
    }
}

int bu_free_ports(int *ports, int n) {
    int *fds = cm_malloc((size_t)(n > 0 ? n : 1) * sizeof *fds), nfds = 0, rc = CM_OK;
    for (; nfds < n; nfds++) {
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        socklen_t alen = sizeof a;
        fds[nfds] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fds[nfds] < 0) {
            rc = CM_EIO;
            break;
        }
        if (bind(fds[nfds], (struct sockaddr *)&a, sizeof a) ||
            getsockname(fds[nfds], (struct sockaddr *)&a, &alen)) {
            rc = CM_EIO;
            nfds++;
            break;
        }
        ports[nfds] = ntohs(a.sin_port);
    }
    for (int i = 0; i < nfds; i++) close(fds[i]);
    free(fds);
    return rc;
}

int bu_port_accepts(int port) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return 0;
    int ok = connect(fd, (struct sockaddr *)&a, sizeof a) == 0;
    close(fd);
    return ok;
}

void bu_catch_signals(void (*fn)(int)) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = fn;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
}
