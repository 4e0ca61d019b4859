/* A UDP echo server and client for tests/docker/rootless.sh, built static so that it runs
 * in a busybox-only image and on the test host alike (busybox's nc has no UDP).
 *
 *   udp echo PORT                 echo every datagram on [::]:PORT (IPv4 too) back, forever
 *   udp send ADDR PORT PAYLOAD    send PAYLOAD (up to 10 tries of 2 s, and 20 s of
 *                                 refusals) and print the reply
 *                                 and where it came from; exit 0 only for an identical reply
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int usage(void)
{
	fprintf(stderr, "usage: udp echo PORT | udp send ADDR PORT PAYLOAD\n");
	return 2;
}

int main(int argc, char **argv)
{
	char buf[65536], from[INET6_ADDRSTRLEN];
	struct sockaddr_in6 a6;
	int s, zero = 0;

	if (argc == 3 && !strcmp(argv[1], "echo")) {
		s = socket(AF_INET6, SOCK_DGRAM, 0);
		if (s < 0) {
			perror("socket");
			return 1;
		}
		setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
		memset(&a6, 0, sizeof(a6));
		a6.sin6_family = AF_INET6;
		a6.sin6_port = htons(atoi(argv[2]));
		if (bind(s, (struct sockaddr *)&a6, sizeof(a6))) {
			perror("bind");
			return 1;
		}
		for (;;) {
			struct sockaddr_storage peer;
			socklen_t len = sizeof(peer);
			ssize_t n = recvfrom(s, buf, sizeof(buf), 0, (struct sockaddr *)&peer, &len);

			if (n >= 0)
				sendto(s, buf, n, 0, (struct sockaddr *)&peer, len);
		}
	}
	if (argc == 5 && !strcmp(argv[1], "send")) {
		struct sockaddr_storage dst;
		socklen_t dlen;
		size_t plen = strlen(argv[4]);
		struct sockaddr_in *d4 = (struct sockaddr_in *)&dst;
		struct sockaddr_in6 *d6 = (struct sockaddr_in6 *)&dst;

		memset(&dst, 0, sizeof(dst));
		if (inet_pton(AF_INET, argv[2], &d4->sin_addr) == 1) {
			d4->sin_family = AF_INET;
			d4->sin_port = htons(atoi(argv[3]));
			dlen = sizeof(*d4);
		} else if (inet_pton(AF_INET6, argv[2], &d6->sin6_addr) == 1) {
			d6->sin6_family = AF_INET6;
			d6->sin6_port = htons(atoi(argv[3]));
			dlen = sizeof(*d6);
		} else {
			return usage();
		}
		s = socket(dst.ss_family, SOCK_DGRAM, 0);
		if (s < 0 || connect(s, (struct sockaddr *)&dst, dlen)) {
			perror("connect");
			return 1;
		}
		/* 10 tries that time out; a refusal (nothing listens yet: a port `-u auto`
		 * publishes within a second) is no try, it waits 0.2 s, 100 of them at most:
		 * 20 s, what the script gives a published TCP port. */
		for (int tries = 0, refused = 0; tries < 10 && refused < 100;) {
			struct pollfd p = { .fd = s, .events = POLLIN };
			struct sockaddr_storage peer;
			socklen_t len = sizeof(peer);
			ssize_t n = -1;

			if (send(s, argv[4], plen, 0) >= 0) {
				if (poll(&p, 1, 2000) != 1) {
					tries++;
					continue;
				}
				n = recvfrom(s, buf, sizeof(buf) - 1, 0, (struct sockaddr *)&peer, &len);
			}
			if (n < 0) {
				refused++;
				usleep(200000);
				continue;
			}
			buf[n] = 0;
			if (peer.ss_family == AF_INET)
				inet_ntop(AF_INET, &((struct sockaddr_in *)&peer)->sin_addr, from, sizeof(from));
			else
				inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&peer)->sin6_addr, from, sizeof(from));
			printf("udp reply from %s: %s\n", from, buf);
			return (size_t)n == plen && !memcmp(buf, argv[4], plen) ? 0 : 1;
		}
		fprintf(stderr, "udp: no reply from %s port %s\n", argv[2], argv[3]);
		return 1;
	}
	return usage();
}
