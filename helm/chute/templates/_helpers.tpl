{{/* Names */}}
{{- define "chute.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "chute.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "chute.component.fullname" (dict "root" $ "component" "ingestor") */}}
{{- define "chute.component.fullname" -}}
{{- printf "%s-%s" (include "chute.fullname" .root | trunc 50 | trimSuffix "-") .component -}}
{{- end -}}

{{- define "chute.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "chute.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: chute
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "chute.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chute.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Labels of one component: common + selector */}}
{{- define "chute.componentLabels" -}}
{{ include "chute.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "chute.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "chute.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* "chute.image" (dict "root" $ "svc" .Values.ingestor) */}}
{{- define "chute.image" -}}
{{- $tag := .svc.tag | default .root.Values.image.tag | default .root.Chart.AppVersion -}}
{{- printf "%s/%s:%s" (trimSuffix "/" .root.Values.image.registry) .svc.image $tag -}}
{{- end -}}

{{/* Endpoints */}}
{{- define "chute.natsUrl" -}}
{{- if .Values.jetstream.url -}}
{{- .Values.jetstream.url -}}
{{- else if .Values.nats.enabled -}}
{{- /* Service of the official NATS chart: its fullname is <release>-nats unless the release name contains "nats". */ -}}
{{- $svc := ternary .Release.Name (printf "%s-nats" .Release.Name) (contains "nats" .Release.Name) -}}
{{- printf "nats://%s.%s.svc:4222" $svc .Release.Namespace -}}
{{- else -}}
{{- fail "jetstream.url is required (or set nats.enabled=true to install the official NATS chart)" -}}
{{- end -}}
{{- end -}}

{{- define "chute.clickhouseUrl" -}}
{{- if .Values.clickhouse.url -}}
{{- .Values.clickhouse.url -}}
{{- else if .Values.clickhouse.installation.enabled -}}
{{- printf "http://clickhouse-%s.%s.svc:8123" .Values.clickhouse.installation.name .Release.Namespace -}}
{{- else -}}
{{- fail "clickhouse.url is required (or set clickhouse.installation.enabled=true)" -}}
{{- end -}}
{{- end -}}

{{- define "chute.clickhouseCluster" -}}
{{- if .Values.clickhouse.cluster -}}
{{- .Values.clickhouse.cluster -}}
{{- else if .Values.clickhouse.installation.enabled -}}
{{- .Values.clickhouse.installation.clusterName -}}
{{- end -}}
{{- end -}}

{{/* Secrets */}}
{{- define "chute.secretName" -}}
{{- include "chute.fullname" . -}}
{{- end -}}

{{- define "chute.clickhouseSecretName" -}}
{{- default (include "chute.secretName" .) .Values.clickhouse.existingSecret -}}
{{- end -}}

{{- define "chute.apiKeysSecretName" -}}
{{- default (include "chute.secretName" .) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "chute.apiKeysSecretKey" -}}
{{- if .Values.auth.existingSecret -}}{{ .Values.auth.existingSecretKey }}{{- else -}}api-keys{{- end -}}
{{- end -}}

{{/* Checks that fail the render with a message instead of producing a broken install. */}}
{{- define "chute.validate" -}}
{{- $p := int .Values.config.partitions -}}
{{- if lt $p 1 }}{{ fail "config.partitions must be >= 1" }}{{ end -}}
{{- $a := .Values.aggregator.autoscaling -}}
{{- if not (has $a.mode (list "none" "hpa" "keda")) }}{{ fail "aggregator.autoscaling.mode must be none, hpa or keda" }}{{ end -}}
{{- if and (eq $a.mode "none") (gt (int .Values.aggregator.replicas) $p) -}}
{{- fail (printf "aggregator.replicas (%d) must not exceed config.partitions (%d): an aggregator without a partition only idles" (int .Values.aggregator.replicas) $p) -}}
{{- end -}}
{{- if and (ne $a.mode "none") (gt (int $a.maxReplicas) $p) -}}
{{- fail (printf "aggregator.autoscaling.maxReplicas (%d) must not exceed config.partitions (%d)" (int $a.maxReplicas) $p) -}}
{{- end -}}
{{- if and (ne $a.mode "none") (gt (int $a.minReplicas) (int $a.maxReplicas)) -}}
{{- fail "aggregator.autoscaling.minReplicas must not exceed maxReplicas" -}}
{{- end -}}
{{- include "chute.validateSecurity" . -}}
{{- if and .Values.clickhouse.installation.enabled (not .Values.clickhouse.installation.keeper.enabled) (not .Values.clickhouse.installation.zookeeperNodes) (gt (int .Values.clickhouse.installation.replicas) 1) -}}
{{- fail "clickhouse.installation with replicas > 1 needs keeper.enabled or zookeeperNodes" -}}
{{- end -}}
{{- $_ := include "chute.natsUrl" . -}}
{{- $_ := include "chute.clickhouseUrl" . -}}
{{- end -}}

{{/* Pod-level pieces shared by every Chute pod. */}}
{{- define "chute.podCommon" -}}
serviceAccountName: {{ include "chute.serviceAccountName" . }}
automountServiceAccountToken: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Scheduling of one component: (dict "svc" .Values.ingestor) */}}
{{- define "chute.scheduling" -}}
{{- with .svc.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .svc.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .svc.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .svc.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Hook events of the migration Job. */}}
{{- define "chute.migrationHooks" -}}
{{- if .Values.migrations.hooks -}}
{{- .Values.migrations.hooks -}}
{{- else if .Values.clickhouse.installation.enabled -}}
post-install,pre-upgrade
{{- else -}}
pre-install,pre-upgrade
{{- end -}}
{{- end -}}
