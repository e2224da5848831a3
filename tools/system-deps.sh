#!/usr/bin/env bash
# System tools the tests use: iproute2 (hosts made of network namespaces),
# iptables (a silent firewall that cuts links), openssl (the TLS tests'
# certificates), slurm-wlm and munge (a one-node Slurm the launcher tests
# start themselves), openssh-server and -client (SSH hosts in namespaces),
# chromium-headless-shell (the dashboard's pages, loaded with their
# JavaScript) and prometheus (one real scrape of /metrics). Installed with
# apt-get when missing and run as root;
# otherwise says what is missing (the tests that need it then fail under CI,
# and are skipped elsewhere).
set -euo pipefail
missing=()
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v iptables >/dev/null 2>&1 || missing+=(iptables)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v sbatch >/dev/null 2>&1 && [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] || missing+=(slurm-wlm)
[ -x /usr/sbin/munged ] || missing+=(munge)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v ssh >/dev/null 2>&1 || missing+=(openssh-client)
command -v chromium-headless-shell >/dev/null 2>&1 || missing+=(chromium-headless-shell)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    # A package manager stopped half-way (a killed install) blocks apt-get.
    dpkg --configure -a >/dev/null 2>&1 || true
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
else
    echo "not installed (install them as root for the network tests): ${missing[*]}" >&2
fi
