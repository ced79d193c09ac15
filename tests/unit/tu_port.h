/* tu_port.h - a free port of 127.0.0.1 below the kernel's ephemeral range,
 * for a unit test that restarts a server on the same port or connects
 * before anything listens there.
 * SPDX-License-Identifier: MIT
 *
 * A port from bind(0) lies in the range the kernel also uses for the source
 * port of every outgoing connection: once its server is gone, any connect()
 * (another test's, or a client of this one retrying the very port, which
 * then connects to itself) may take it, and the restart fails with "address
 * in use". Ports below the range are only taken by an explicit bind.
 * scripts/launch.py's free_ports() does the same for the integration tests.
 */
#ifndef TU_PORT_H
#define TU_PORT_H
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* A port nothing was bound to a moment ago (checked with a bind): below the
 * ephemeral range, or the kernel's choice where there is no room below it;
 * 0 if no socket could be made. */
static inline int tu_free_port(void) {
    int lo = 32768, hi = 60999;
    FILE *f = fopen("/proc/sys/net/ipv4/ip_local_port_range", "r");
    if (f) {
        if (fscanf(f, "%d %d", &lo, &hi) != 2) lo = 32768;
        fclose(f);
    }
    static unsigned seed;
    if (!seed) seed = (unsigned)time(NULL) ^ ((unsigned)getpid() << 16);
    /* Below the range, else above it (as launch.py's free_ports). */
    int from = 10000, to = lo;
    if (to - from < 2000) from = hi + 1, to = 65536;
    int room = to - from >= 2000;
    for (int k = 0; k < 1000; k++) {
        int port = room ? from + (int)(rand_r(&seed) % (unsigned)(to - from)) : 0;
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) return 0;
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                                .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        socklen_t len = sizeof a;
        int ok = bind(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
                 getsockname(fd, (struct sockaddr *)&a, &len) == 0;
        close(fd);
        if (ok) return ntohs(a.sin_port);
    }
    return 0;
}

#endif /* TU_PORT_H */
