#!/usr/bin/env bash
# Make the files docker-compose.secure.yml mounts as secrets, with openssl:
#   deploy/make-secrets.sh [DIR]        (default deploy/secrets; never commit it)
# - ca.crt / ca.key: a private CA (keep ca.key offline in real use);
# - server.crt / server.key: the servers' certificate, valid for the names clients and Envoy
#   dial (server, localhost, 127.0.0.1; add yours with EXTRA_SANS="DNS:example.org,IP:10.0.0.5");
# - client.crt / client.key: a client certificate, for --tls-require-client-cert;
# - tokens: one admin and one infer bearer token (random), the server's --token-file.
# Renewing: run it again (a new CA unless ca.crt exists), then `docker compose kill -s SIGHUP server`
# (not strictly needed: the files are rewritten in place and the servers notice the change).
set -euo pipefail
dir=${1:-"$(dirname "$0")/secrets"}
umask 077
mkdir -p "$dir"
cd "$dir"
days=${DAYS:-365}
sans="DNS:server,DNS:server-gpu,DNS:localhost,IP:127.0.0.1${EXTRA_SANS:+,$EXTRA_SANS}"
if [ ! -f ca.crt ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.crt \
    -days "$days" -subj "/CN=rnnserve CA" 2>/dev/null
fi
issue() {   # NAME EXTENSIONS
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$1.key" -out "$1.csr" \
    -subj "/CN=$1" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$1.crt" -days "$days" \
    -extfile <(printf '%s\n' "$2") 2>/dev/null
  rm -f "$1.csr"
}
issue server "subjectAltName=$sans
extendedKeyUsage=serverAuth"
issue client "extendedKeyUsage=clientAuth"
if [ ! -f tokens ]; then
  printf '# ROLE TOKEN (rnnserve --token-file)\nadmin %s\ninfer %s\n' \
    "$(openssl rand -hex 24)" "$(openssl rand -hex 24)" > tokens
fi
chmod 644 ./*.crt tokens server.key client.key   # read by the containers' user; keep the folder private
echo "secrets in $dir: ca.crt server.crt server.key client.crt client.key tokens"
