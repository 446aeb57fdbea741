#!/bin/sh
# A development TLS certificate for nginx: a local CA and a server certificate it signs, for
# localhost, 127.0.0.1, ::1 and the compose service name `nginx`. Made once, reused while
# valid; a file that is missing, expires within 30 days, does not match its key or is not
# signed by the CA is made again. DIR belongs to this script: put your own certificate
# elsewhere (NGINX_TLS_CERTIFICATE / NGINX_TLS_CERTIFICATE_KEY), where it is never touched.
# POSIX sh and the openssl CLI (3.0+) only: it runs in the nginx image and in `make run`.
#   usage: dev-certs.sh DIR      writes DIR/ca.crt, DIR/ca.key, DIR/server.crt, DIR/server.key
set -eu
dir=${1:?usage: dev-certs.sh DIR}
ca_crt=$dir/ca.crt
ca_key=$dir/ca.key
crt=$dir/server.crt
key=$dir/server.key
renew_before=2592000 # seconds: 30 days
server_names=DNS:localhost,DNS:nginx,IP:127.0.0.1,IP:::1

mkdir -p "$dir"
# Readable by other users (the tests container trusts ca.crt as uid 10001); keys are not.
# Only when it is ours: a Kubernetes emptyDir is root's, mode 0777, and only its owner may
# change that (it is readable by all already).
if [ -O "$dir" ]; then
    chmod 0755 "$dir"
fi

valid_for_a_while() {
    [ -s "$1" ] && openssl x509 -in "$1" -noout -checkend "$renew_before" >/dev/null 2>&1
}

same_public_key() {
    [ -s "$2" ] && [ "$(openssl x509 -in "$1" -noout -pubkey 2>/dev/null)" = "$(openssl pkey -in "$2" -pubout 2>/dev/null)" ]
}

new_key() {
    (umask 077 && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1.new" 2>/dev/null)
}

if ! valid_for_a_while "$ca_crt" || ! same_public_key "$ca_crt" "$ca_key"; then
    new_key "$ca_key"
    openssl req -x509 -new -key "$ca_key.new" -out "$ca_crt.new" -days 3650 -sha256 \
        -subj "/O=websockets-behind-nginx/CN=websockets-behind-nginx development CA $(uname -n)" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
        -addext "keyUsage=critical,keyCertSign,cRLSign"
    mv "$ca_key.new" "$ca_key"
    mv "$ca_crt.new" "$ca_crt"
    chmod 0644 "$ca_crt"
    echo "dev-certs: created a development CA: $ca_crt"
fi

if ! valid_for_a_while "$crt" || ! same_public_key "$crt" "$key" \
    || ! openssl verify -CAfile "$ca_crt" "$crt" >/dev/null 2>&1; then
    new_key "$key"
    # 365 days: within what browsers accept for a server certificate.
    openssl req -x509 -new -key "$key.new" -out "$crt.new" -days 365 -sha256 \
        -CA "$ca_crt" -CAkey "$ca_key" -subj "/O=websockets-behind-nginx/CN=localhost" \
        -addext "subjectAltName=$server_names" \
        -addext "basicConstraints=critical,CA:FALSE" \
        -addext "keyUsage=critical,digitalSignature" \
        -addext "extendedKeyUsage=serverAuth"
    mv "$key.new" "$key"
    mv "$crt.new" "$crt"
    chmod 0644 "$crt"
    echo "dev-certs: created a server certificate for $server_names: $crt"
fi
