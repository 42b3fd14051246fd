/* A plain C UDP reflector: the independent check of `pcp-loadtest
 * reflect`. One thread and one SO_REUSEPORT socket per thread, recvmmsg
 * (MSG_WAITFORONE) then one sendmmsg echoing the batch, buffers allocated
 * once. Built and run by loadtest/report.sh; loopback only, bounded in time.
 *
 *   cc -O2 -pthread -o reflect-c loadtest/baseline/reflect.c
 *   ./reflect-c 127.0.0.20 5398 2 900     (address, port, threads, seconds)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define BATCH 32
#define BUF 1500

static struct sockaddr_in listen_addr;
static time_t deadline;

static int open_socket(void) {
  int fd = socket(AF_INET, SOCK_DGRAM, 0), one = 1, size = 8 << 20;
  struct timeval tv = {0, 200000};
  if (fd < 0) return -1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
  setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
  if (bind(fd, (struct sockaddr *)&listen_addr, sizeof listen_addr) < 0) {
    perror("bind");
    exit(1);
  }
  return fd;
}

static void *loop(void *arg) {
  int fd = *(int *)arg;
  static __thread char bufs[BATCH][BUF];
  struct sockaddr_in addrs[BATCH];
  struct iovec iov[BATCH];
  struct mmsghdr msgs[BATCH];
  while (time(NULL) < deadline) {
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BATCH; i++) {
      iov[i].iov_base = bufs[i];
      iov[i].iov_len = BUF;
      msgs[i].msg_hdr.msg_iov = &iov[i];
      msgs[i].msg_hdr.msg_iovlen = 1;
      msgs[i].msg_hdr.msg_name = &addrs[i];
      msgs[i].msg_hdr.msg_namelen = sizeof addrs[i];
    }
    int n = recvmmsg(fd, msgs, BATCH, MSG_WAITFORONE, NULL);
    if (n <= 0) continue;
    for (int i = 0; i < n; i++) iov[i].iov_len = msgs[i].msg_len;
    sendmmsg(fd, msgs, n, 0);
  }
  return NULL;
}

int main(int argc, char **argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: %s ADDRESS PORT THREADS SECONDS\n", argv[0]);
    return 2;
  }
  int threads = atoi(argv[3]);
  if (threads < 1 || threads > 64) threads = 1;
  listen_addr.sin_family = AF_INET;
  listen_addr.sin_port = htons((unsigned short)atoi(argv[2]));
  if (inet_pton(AF_INET, argv[1], &listen_addr.sin_addr) != 1) {
    fprintf(stderr, "%s: not an IPv4 address\n", argv[1]);
    return 2;
  }
  /* Loopback only (network tests stay on 127.0.0.0/8). */
  if ((ntohl(listen_addr.sin_addr.s_addr) >> 24) != 127) {
    fprintf(stderr, "%s: loopback addresses only\n", argv[1]);
    return 2;
  }
  long secs = atol(argv[4]);
  deadline = time(NULL) + (secs > 0 && secs <= 1800 ? secs : 1800);
  pthread_t tid[64];
  int fds[64];
  for (int i = 0; i < threads; i++) fds[i] = open_socket();
  for (int i = 0; i < threads; i++) pthread_create(&tid[i], NULL, loop, &fds[i]);
  for (int i = 0; i < threads; i++) pthread_join(tid[i], NULL);
  return 0;
}
