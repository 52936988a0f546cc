/* The pod sandbox ("pause") image's only program: PID 1 of every pod on the local real node.
 * It holds the pod's namespaces open, reaps the zombies of its pid namespace and exits on
 * SIGINT/SIGTERM. Built with `gcc -static` into an image (e2e/node.py); no registry needed. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) {
	(void)sig;
	_exit(0);
}

static void reap(int sig) {
	(void)sig;
	while (waitpid(-1, NULL, WNOHANG) > 0) {
	}
}

int main(void) {
	struct sigaction sa = {0};
	sa.sa_handler = stop;
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	sa.sa_handler = reap;
	sa.sa_flags = SA_NOCLDSTOP;
	sigaction(SIGCHLD, &sa, NULL);
	if (getpid() != 1)
		fprintf(stderr, "pause: not PID 1; the reaping only matters as PID 1\n");
	for (;;)
		pause();
}
