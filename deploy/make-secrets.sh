#!/bin/sh
# Credentials for running tkg with TLS and auth on (compose mounts deploy/secrets/; Kubernetes
# takes the same files as the Secrets tkg-tls and tkg-auth, see the README's Security section).
#
#   sh deploy/make-secrets.sh [OUT_DIR]        # default deploy/secrets; needs openssl
#
# Writes: ca.crt/ca.key (a private CA), tls.crt/tls.key (the server, for localhost, 127.0.0.1,
# tkg and the headless Service's pod names), probe-token (read-only, tenant "probe": what the
# health checks send), team-a-token (full access, tenant "team-a"), peer-token (role peer: what a
# replica draining with --peers presents via --peer-token-file, so every tenant's sequences move)
# and auth.yaml (their SHA-256 hashes, no secrets). Existing files are kept: delete them to rotate.
set -eu
out="${1:-$(dirname "$0")/secrets}"
mkdir -p "$out"
cd "$out"
umask 077
if [ ! -f ca.key ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 825 \
        -subj "/CN=tkg-ca" -keyout ca.key -out ca.crt 2>/dev/null
fi
if [ ! -f tls.key ]; then
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=tkg" \
        -keyout tls.key -out tls.csr 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1,DNS:tkg,DNS:tkg-headless,DNS:*.tkg-headless,DNS:*.tkg-headless.default.svc.cluster.local\nextendedKeyUsage=serverAuth\n' > tls.ext
    openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 \
        -extfile tls.ext -out tls.crt 2>/dev/null
    rm -f tls.csr tls.ext ca.srl
fi
for name in probe-token team-a-token peer-token; do
    [ -f "$name" ] || openssl rand -hex 24 > "$name"
done
hash() { tr -d '\n' < "$1" | openssl dgst -sha256 -r | cut -d' ' -f1; }
cat > auth.yaml <<YAML
# tkg --auth-file: token hashes only (sha256 of each token file's line). Reloaded on SIGHUP.
tenants:
  - name: probe
    role: read-only
    token_sha256: $(hash probe-token)
    quota: {max_sequences: 1, max_blocks: 1, max_pending: 1, max_streams: 1}
  - name: team-a
    role: full
    token_sha256: $(hash team-a-token)
  - name: replicas
    role: peer
    token_sha256: $(hash peer-token)
YAML
chmod 0644 ca.crt tls.crt auth.yaml
# The server runs as uid 10001 in the images and must read its key and the token files.
chmod 0644 tls.key probe-token team-a-token peer-token
echo "tkg secrets in $out: ca.crt tls.crt tls.key probe-token team-a-token peer-token auth.yaml"
