#!/usr/bin/env bash
# Writes the local broker's TLS files and SCRAM login into an empty folder (kafka.sh renames it
# into place as $KAFKA_TLS_DIR; run `bash infra/kafka/kafka.sh certs` or `make kafka-tls`):
#
#   bash infra/kafka/make-certs.sh OUT_DIR FINAL_DIR SCRAM_USER
#
# A local CA and a broker certificate for localhost and 127.0.0.1, all PEM: the broker reads its
# key and chain with ssl.keystore.type=PEM, Python clients trust ca.pem. Valid 10 years;
# kafka.sh makes a new set when the broker certificate has less than a day left.
set -euo pipefail
out="$1" final="$2" user="$3"
cd "$out"
umask 077

cat >ext.cnf <<'EOF'
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[broker]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
EOF

# genpkey writes PKCS#8, the key format Kafka's PEM keystore reads (unencrypted: no ssl.key.password)
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out ca.key
openssl req -new -key ca.key -subj "/CN=skyfuse local Kafka CA" -out ca.csr
openssl x509 -req -in ca.csr -signkey ca.key -days 3650 -extfile ext.cnf -extensions ca -out ca.pem
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out broker.key
openssl req -new -key broker.key -subj "/CN=localhost" -out broker.csr
openssl x509 -req -in broker.csr -CA ca.pem -CAkey ca.key -set_serial "0x$(openssl rand -hex 16)" \
  -days 3650 -extfile ext.cnf -extensions broker -out broker.crt
cat broker.key broker.crt ca.pem >broker.pem
rm -f ca.csr broker.csr broker.key broker.crt ext.cnf
chmod 644 ca.pem

printf '%s\n' "$user" >scram-user
# Starts with a letter, so that SKYFUSE_* environment parsing (TOML values) keeps it a string.
password="p$(openssl rand -hex 20)"
printf '%s\n' "$password" >scram-password
cat >client.properties <<EOF
# Java tools on the SASL_SSL listener: --command-config $final/client.properties
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="$user" password="$password";
ssl.truststore.type=PEM
ssl.truststore.location=$final/ca.pem
EOF
