{{/*
Secure defaults: generated secrets and the environment, mounts and volumes through which each
service gets its API keys, NATS credentials, ClickHouse login and TLS files.
*/}}

{{- define "chute.secure" -}}
{{- if not .Values.insecure }}true{{ end -}}
{{- end -}}

{{- define "chute.natsAuthSecretName" -}}
{{- default (printf "%s-nats-auth" .Release.Name) .Values.jetstream.auth.existingSecret -}}
{{- end -}}

{{/*
A generated secret value: (dict "root" $ "secret" <Secret name> "key" <key>). The same value for
the whole render (the hook Secret and the release's Secret must agree), the one already in the
release's Secret when it exists (`lookup`: stable across `helm upgrade`; `helm template` and
client-side dry runs cannot look, so they show fresh values), else 32 random letters and digits,
the first a letter: nats-server reads a `$VARIABLE` reference as a config value, and one that
starts with digits can parse as a number or size (`12kb`) and stop the server.
*/}}
{{- define "chute.generated" -}}
{{- $root := .root -}}
{{- if not (hasKey $root.Values "__chuteGenerated") -}}
{{- $_ := set $root.Values "__chuteGenerated" (dict) -}}
{{- end -}}
{{- $cache := get $root.Values "__chuteGenerated" -}}
{{- $cacheKey := printf "%s/%s" .secret .key -}}
{{- if not (hasKey $cache $cacheKey) -}}
{{- $existing := lookup "v1" "Secret" $root.Release.Namespace .secret | default (dict) -}}
{{- $previous := dig "data" .key "" $existing -}}
{{- $_ := set $cache $cacheKey (ternary ($previous | b64dec) (printf "%s%s" (randAlpha 1) (randAlphaNum 31)) (ne $previous "")) -}}
{{- end -}}
{{- get $cache $cacheKey -}}
{{- end -}}

{{/* The api-keys file: given keys, or one generated key per `auth.generatedTenants`, then the
[client-certs] section. */}}
{{- define "chute.apiKeysFile" -}}
{{- $root := . -}}
{{- if .Values.auth.apiKeys }}
{{- range .Values.auth.apiKeys }}
{{- if or (not .tenant) (not .key) }}{{ fail "auth.apiKeys entries need tenant and key" }}{{ end }}
{{- if lt (len .key) 16 }}{{ fail (printf "auth.apiKeys: the key of tenant %s is shorter than 16 characters" .tenant) }}{{ end }}
{{ .tenant }} {{ .key }}
{{- end }}
{{- else }}
{{- range .Values.auth.generatedTenants }}
{{ . }} {{ include "chute.generated" (dict "root" $root "secret" (include "chute.secretName" $root) "key" (printf "api-key-%s" .)) }}
{{- end }}
{{- end }}
{{- with .Values.auth.clientCerts }}
[client-certs]
{{- range . }}
{{- if or (not .tenant) (not .name) }}{{ fail "auth.clientCerts entries need tenant and name" }}{{ end }}
{{ .tenant }} {{ .name }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Whether the services enforce API keys / use their own NATS and ClickHouse users. */}}
{{- define "chute.authOn" -}}
{{- if and (not .Values.insecure) .Values.auth.enabled }}true{{ end -}}
{{- end -}}

{{- define "chute.natsAuthOn" -}}
{{- if not .Values.insecure }}true{{ end -}}
{{- end -}}

{{- define "chute.clickhouseUsersOn" -}}
{{- if not .Values.insecure }}true{{ end -}}
{{- end -}}

{{- define "chute.networkPolicyOn" -}}
{{- if and (not .Values.insecure) .Values.networkPolicy.enabled }}true{{ end -}}
{{- end -}}

{{/* TLS Secret of a listener: (dict "root" $ "component" "ingestor"|"query-api"). */}}
{{- define "chute.tlsSecret" -}}
{{- $t := .root.Values.tls -}}
{{- if $t.enabled -}}
{{- if eq .component "ingestor" }}{{ default $t.existingSecret $t.ingestorSecret }}{{ else if eq .component "query-api" }}{{ default $t.existingSecret $t.queryApiSecret }}{{ end -}}
{{- end -}}
{{- end -}}

{{/* ClickHouse role of a component: the aggregator inserts; the query API and the router (which
reads events and rollups to rebuild its windows at start) read with the query user. */}}
{{- define "chute.clickhouseRole" -}}
{{- ternary "aggregator" "query" (eq . "aggregator") -}}
{{- end -}}

{{/* ClickHouse password key of a role in the chart's Secret or `clickhouse.users.existingSecret`. */}}
{{- define "chute.clickhouseUserKey" -}}
{{- if .root.Values.clickhouse.users.existingSecret }}{{ .role }}{{ else }}clickhouse-{{ .role }}-password{{ end -}}
{{- end -}}

{{- define "chute.clickhouseUsersSecretName" -}}
{{- default (include "chute.secretName" .) .Values.clickhouse.users.existingSecret -}}
{{- end -}}

{{/*
Security environment of one component: (dict "root" $ "component" C), C one of ingestor,
aggregator, query-api, router. Paths match "chute.securityVolumeMounts".
*/}}
{{- define "chute.securityEnv" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $component := .component -}}
{{- if and (include "chute.authOn" $root) (has $component (list "ingestor" "query-api")) }}
- name: CHUTE_API_KEYS_FILE
  value: /etc/chute/api-keys/api-keys
{{- end }}
{{- if include "chute.natsAuthOn" $root }}
{{- $user := get $v.jetstream.auth.users (ternary "queryApi" $component (eq $component "query-api")) }}
{{- if eq $v.jetstream.auth.method "password" }}
- name: CHUTE_NATS_USER
  value: {{ $user.user | quote }}
- name: CHUTE_NATS_PASSWORD_FILE
  value: /etc/chute/nats-auth/credential
{{- else if eq $v.jetstream.auth.method "nkey" }}
- name: CHUTE_NATS_NKEY_SEED_FILE
  value: /etc/chute/nats-auth/credential
{{- else }}
- name: CHUTE_NATS_CREDS
  value: /etc/chute/nats-auth/credential
{{- end }}
{{- with $user.inboxPrefix }}
- name: CHUTE_NATS_INBOX_PREFIX
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- if $v.jetstream.tls.caSecret }}
- name: CHUTE_NATS_TLS_CA
  value: /etc/chute/nats-tls-ca/ca.crt
{{- end }}
{{- if $v.jetstream.tls.clientCertSecret }}
- name: CHUTE_NATS_TLS_CERT
  value: /etc/chute/nats-tls/tls.crt
- name: CHUTE_NATS_TLS_KEY
  value: /etc/chute/nats-tls/tls.key
{{- end }}
{{- if ne $component "ingestor" }}
{{- include "chute.clickhouseEnv" (dict "root" $root "role" (include "chute.clickhouseRole" $component)) }}
{{- end }}
{{- if include "chute.tlsSecret" . }}
- name: CHUTE_TLS_CERT
  value: /etc/chute/tls/tls.crt
- name: CHUTE_TLS_KEY
  value: /etc/chute/tls/tls.key
- name: CHUTE_TLS_RELOAD_INTERVAL
  value: {{ $v.tls.reloadInterval | quote }}
{{- if $v.tls.clientCa.enabled }}
- name: CHUTE_TLS_CLIENT_CA
  value: /etc/chute/tls-client-ca/ca.crt
{{- end }}
{{- end }}
{{- end -}}

{{/* ClickHouse login of a service: (dict "root" $ "role" "aggregator"|"query"). */}}
{{- define "chute.clickhouseEnv" -}}
{{- $v := .root.Values -}}
{{- if include "chute.clickhouseUsersOn" .root }}
- name: CHUTE_CLICKHOUSE_USER
  value: {{ get $v.clickhouse.users .role | quote }}
- name: CHUTE_CLICKHOUSE_PASSWORD_FILE
  value: /etc/chute/clickhouse/password
{{- else }}
- name: CHUTE_CLICKHOUSE_USER
  valueFrom:
    secretKeyRef:
      name: {{ include "chute.clickhouseSecretName" .root }}
      key: {{ ternary $v.clickhouse.existingSecretUserKey "clickhouse-user" (ne $v.clickhouse.existingSecret "") }}
- name: CHUTE_CLICKHOUSE_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "chute.clickhouseSecretName" .root }}
      key: {{ ternary $v.clickhouse.existingSecretPasswordKey "clickhouse-password" (ne $v.clickhouse.existingSecret "") }}
{{- end }}
{{- if $v.clickhouse.caSecret }}
- name: CHUTE_CLICKHOUSE_CA
  value: /etc/chute/clickhouse-ca/ca.crt
{{- end }}
{{- end -}}

{{- define "chute.securityVolumeMounts" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $component := .component -}}
{{- if and (include "chute.authOn" $root) (has $component (list "ingestor" "query-api")) }}
- name: api-keys
  mountPath: /etc/chute/api-keys
  readOnly: true
{{- end }}
{{- if include "chute.natsAuthOn" $root }}
- name: nats-auth
  mountPath: /etc/chute/nats-auth
  readOnly: true
{{- end }}
{{- if $v.jetstream.tls.caSecret }}
- name: nats-tls-ca
  mountPath: /etc/chute/nats-tls-ca
  readOnly: true
{{- end }}
{{- if $v.jetstream.tls.clientCertSecret }}
- name: nats-tls
  mountPath: /etc/chute/nats-tls
  readOnly: true
{{- end }}
{{- if and (ne $component "ingestor") (include "chute.clickhouseUsersOn" $root) }}
- name: clickhouse
  mountPath: /etc/chute/clickhouse
  readOnly: true
{{- end }}
{{- if and (ne $component "ingestor") $v.clickhouse.caSecret }}
- name: clickhouse-ca
  mountPath: /etc/chute/clickhouse-ca
  readOnly: true
{{- end }}
{{- if include "chute.tlsSecret" . }}
- name: tls
  mountPath: /etc/chute/tls
  readOnly: true
{{- if $v.tls.clientCa.enabled }}
- name: tls-client-ca
  mountPath: /etc/chute/tls-client-ca
  readOnly: true
{{- end }}
{{- end }}
{{- end -}}

{{- define "chute.securityVolumes" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $component := .component -}}
{{- if and (include "chute.authOn" $root) (has $component (list "ingestor" "query-api")) }}
- name: api-keys
  secret:
    secretName: {{ include "chute.apiKeysSecretName" $root }}
    items:
      - key: {{ include "chute.apiKeysSecretKey" $root }}
        path: api-keys
{{- end }}
{{- if include "chute.natsAuthOn" $root }}
# This service's own NATS credential only.
- name: nats-auth
  secret:
    secretName: {{ include "chute.natsAuthSecretName" $root }}
    items:
      - key: {{ $component }}
        path: credential
{{- end }}
{{- with $v.jetstream.tls.caSecret }}
- name: nats-tls-ca
  secret:
    secretName: {{ . }}
    items:
      - key: {{ $v.jetstream.tls.caSecretKey }}
        path: ca.crt
{{- end }}
{{- with $v.jetstream.tls.clientCertSecret }}
- name: nats-tls
  secret:
    secretName: {{ . }}
    items:
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
{{- end }}
{{- if and (ne $component "ingestor") (include "chute.clickhouseUsersOn" $root) }}
# This service's own ClickHouse password only.
- name: clickhouse
  secret:
    secretName: {{ include "chute.clickhouseUsersSecretName" $root }}
    items:
      - key: {{ include "chute.clickhouseUserKey" (dict "root" $root "role" (include "chute.clickhouseRole" $component)) }}
        path: password
{{- end }}
{{- if ne $component "ingestor" }}
{{- include "chute.clickhouseCaVolume" $root }}
{{- end }}
{{- with include "chute.tlsSecret" . }}
- name: tls
  secret:
    secretName: {{ . }}
    items:
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
{{- if $v.tls.clientCa.enabled }}
- name: tls-client-ca
  secret:
    secretName: {{ default . $v.tls.clientCa.existingSecret }}
    items:
      - key: {{ $v.tls.clientCa.key }}
        path: ca.crt
{{- end }}
{{- end }}
{{- end -}}

{{- define "chute.clickhouseCaVolume" -}}
{{- with .Values.clickhouse.caSecret }}
- name: clickhouse-ca
  secret:
    secretName: {{ . }}
    items:
      - key: {{ $.Values.clickhouse.caSecretKey }}
        path: ca.crt
{{- end }}
{{- end -}}

{{/* Distinct ports of comma-separated URLs: (dict "urls" "a,b" "defaults" (dict scheme port)). */}}
{{- define "chute.urlPorts" -}}
{{- $ports := list -}}
{{- range $url := splitList "," .urls -}}
{{- $url = trim $url -}}
{{- if $url -}}
{{- $u := urlParse $url -}}
{{- $port := "" -}}
{{- $hostParts := splitList ":" $u.host -}}
{{- if gt (len $hostParts) 1 }}{{ $port = last $hostParts }}{{ end -}}
{{- if not $port }}{{ $port = toString (get $.defaults $u.scheme | default (get $.defaults "")) }}{{ end -}}
{{- $ports = append $ports (int $port) -}}
{{- end -}}
{{- end -}}
{{- $ports | uniq | toJson -}}
{{- end -}}

{{/* Render-time checks of the secure defaults. */}}
{{- define "chute.validateSecurity" -}}
{{- $v := .Values -}}
{{- if not $v.insecure -}}
{{- if not $v.auth.enabled -}}
{{- fail "auth.enabled=false would accept every call without an API key: set insecure: true to allow that (development only)" -}}
{{- end -}}
{{- if not $v.networkPolicy.enabled -}}
{{- fail "networkPolicy.enabled=false removes the NetworkPolicies: set insecure: true to allow that (development only)" -}}
{{- end -}}
{{- if and (not $v.auth.existingSecret) (not $v.auth.apiKeys) (not $v.auth.generatedTenants) -}}
{{- fail "auth.enabled needs auth.apiKeys, auth.generatedTenants or auth.existingSecret" -}}
{{- end -}}
{{- if not (has $v.jetstream.auth.method (list "password" "nkey" "creds")) -}}
{{- fail "jetstream.auth.method must be password, nkey or creds" -}}
{{- end -}}
{{- if and (ne $v.jetstream.auth.method "password") (not $v.jetstream.auth.existingSecret) -}}
{{- fail (printf "jetstream.auth.method=%s needs jetstream.auth.existingSecret (the chart generates passwords only)" $v.jetstream.auth.method) -}}
{{- end -}}
{{- end -}}
{{- if $v.tls.enabled -}}
{{- if or (not (default $v.tls.existingSecret $v.tls.ingestorSecret)) (not (default $v.tls.existingSecret $v.tls.queryApiSecret)) -}}
{{- fail "tls.enabled needs tls.existingSecret (or both tls.ingestorSecret and tls.queryApiSecret)" -}}
{{- end -}}
{{- else if $v.tls.clientCa.enabled -}}
{{- fail "tls.clientCa.enabled needs tls.enabled" -}}
{{- end -}}
{{- if $v.nats.enabled -}}
{{- if and $v.insecure (dig "config" "merge" "authorization" "" $v.nats) -}}
{{- fail "insecure: true with the bundled NATS: drop its users too (--set nats.config.merge.authorization=null --set nats.container.env=null)" -}}
{{- end -}}
{{- if and (not $v.insecure) (ne (default "" $v.nats.chuteAuthSecret) $v.jetstream.auth.existingSecret) -}}
{{- fail (printf "the bundled NATS reads its users' passwords from nats.chuteAuthSecret (%q) but the services from jetstream.auth.existingSecret (%q): set both to the same Secret" (default "" $v.nats.chuteAuthSecret) $v.jetstream.auth.existingSecret) -}}
{{- end -}}
{{- end -}}
{{- if and $v.auth.clientCerts (not $v.tls.clientCa.enabled) -}}
{{- fail "auth.clientCerts needs tls.clientCa.enabled (client certificates are only seen with mutual TLS)" -}}
{{- end -}}
{{- end -}}

{{/* The administrative ClickHouse password (`clickhouse.password`, else generated unless insecure). */}}
{{- define "chute.clickhousePassword" -}}
{{- if .Values.clickhouse.password -}}
{{- .Values.clickhouse.password -}}
{{- else if include "chute.secure" . -}}
{{- include "chute.generated" (dict "root" . "secret" (include "chute.secretName" .) "key" "clickhouse-password") -}}
{{- end -}}
{{- end -}}
