{{/*
Chart name, at most 63 characters (a DNS label).
*/}}
{{- define "stowage.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified release name, the prefix of every object's name. Kept to 48 characters so
that suffixes such as "-webhook-cert" still make valid names.
*/}}
{{- define "stowage.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 48 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "stowage.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object. Call with (dict "ctx" $ "component" "operator"); the component is
optional.
*/}}
{{- define "stowage.labels" -}}
helm.sh/chart: {{ include "stowage.chart" .ctx }}
{{ include "stowage.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: stowage
{{- end }}

{{/*
Selector labels: (dict "ctx" $ "component" "operator").
*/}}
{{- define "stowage.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stowage.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{/*
The stowage image: repository@digest when a digest is given, else repository:tag (the
chart's appVersion by default).
*/}}
{{- define "stowage.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}
{{- end }}

{{/*
Object names.
*/}}
{{- define "stowage.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (printf "%s-operator" (include "stowage.fullname" .)) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name: with serviceAccount.create=false, name the existing ServiceAccount the operator's roles are bound to" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "stowage.cache.adminSecretName" -}}
{{- printf "%s-cache-admin" (include "stowage.fullname" .) }}
{{- end }}

{{- define "stowage.agent.serviceAccountName" -}}
{{- printf "%s-agent" (include "stowage.fullname" .) }}
{{- end }}

{{- define "stowage.registry.serviceAccountName" -}}
{{- printf "%s-registry" (include "stowage.fullname" .) }}
{{- end }}

{{- define "stowage.cache.serviceName" -}}
{{- printf "%s-cache" (include "stowage.fullname" .) }}
{{- end }}

{{- define "stowage.webhook.serviceName" -}}
{{- printf "%s-webhook" (include "stowage.fullname" .) }}
{{- end }}

{{/* Secret where the operator keeps its own CA and serving certificate. */}}
{{- define "stowage.webhook.certSecretName" -}}
{{- printf "%s-webhook-tls" (include "stowage.fullname" .) }}
{{- end }}

{{/* cert-manager Certificate (and its Secret) for the webhook. */}}
{{- define "stowage.webhook.certificateName" -}}
{{- printf "%s-webhook" (include "stowage.fullname" .) }}
{{- end }}

{{- define "stowage.webhook.certificateSecretName" -}}
{{- printf "%s-webhook-cert" (include "stowage.fullname" .) }}
{{- end }}

{{/*
URL of the cluster cache Service, as the node proxies and the operator reach it.
*/}}
{{- define "stowage.cache.url" -}}
{{- printf "http://%s.%s.svc:%d" (include "stowage.cache.serviceName" .) .Release.Namespace (int .Values.cache.port) }}
{{- end }}

{{/*
Registries the cluster cache and the node proxies reach over plain HTTP (--insecure-registry):
cache.insecureRegistries, and the http:// registries the agent mirrors (containerd sends
their pulls to the node proxy, which must reach them the same way). A YAML list.
*/}}
{{- define "stowage.insecureRegistries" -}}
{{- $registries := list }}
{{- range .Values.cache.insecureRegistries }}
{{- $registries = append $registries (toString .) }}
{{- end }}
{{- if .Values.agent.enabled }}
{{- range .Values.agent.mirror.registries }}
{{- if hasPrefix "http://" (toString .) }}
{{- $registries = append $registries (toString . | trimPrefix "http://" | trimSuffix "/") }}
{{- end }}
{{- end }}
{{- end }}
{{- toYaml ($registries | uniq) }}
{{- end }}

{{/*
Namespaces whose pods the webhook never sees: the ignored ones and the release's own.
*/}}
{{- define "stowage.webhook.ignoredNamespaces" -}}
{{- $namespaces := concat (.Values.operator.ignoredNamespaces | default list) (list .Release.Namespace) }}
{{- toYaml ($namespaces | uniq) }}
{{- end }}

{{/*
Security contexts shared by every pod and container.
*/}}
{{- define "stowage.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext }}
{{- end }}

{{- define "stowage.containerSecurityContext" -}}
{{- toYaml .Values.securityContext }}
{{- end }}

{{/*
--log-level / --log-format flags.
*/}}
{{/*
Arguments of a `stowage serve` container (node proxy, cluster cache):
(dict "ctx" $ "values" .Values.proxy "before" list "after" list); "before" goes after
--listen, "after" after the registries.
*/}}
{{- define "stowage.serveArgs" -}}
{{- $v := .values -}}
- serve
- {{ printf "--listen=0.0.0.0:%d" (int $v.port) | quote }}
{{- range .before }}
- {{ . | quote }}
{{- end }}
- "--data=/var/lib/stowage"
{{- with $v.maxSize }}
- {{ printf "--max-size=%v" . | quote }}
{{- end }}
{{- with $v.tagTTL }}
- {{ printf "--tag-ttl=%v" . | quote }}
{{- end }}
{{- range include "stowage.insecureRegistries" .ctx | fromYamlArray }}
- {{ printf "--insecure-registry=%s" . | quote }}
{{- end }}
{{- range .after }}
- {{ . | quote }}
{{- end }}
{{ include "stowage.logArgs" .ctx }}
{{- range $v.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{- define "stowage.logArgs" -}}
- {{ printf "--log-level=%s" .Values.log.level | quote }}
- {{ printf "--log-format=%s" .Values.log.format | quote }}
{{- end }}

{{/*
Tolerations of the node DaemonSets (agent, proxy): (dict "ctx" $ "tolerations" list).
With agent.startupTaint, the start-up taint is tolerated too (unless a toleration of every
taint is already there): both must run on a node before the taint comes off.
*/}}
{{- define "stowage.nodeTolerations" -}}
{{- $tolerations := .tolerations | default list }}
{{- if and .ctx.Values.agent.enabled .ctx.Values.agent.startupTaint }}
{{- $all := false }}
{{- range $tolerations }}
{{- if and (eq (toString .operator) "Exists") (not .key) (not .effect) }}
{{- $all = true }}
{{- end }}
{{- end }}
{{- if not $all }}
{{- $tolerations = append $tolerations (dict "key" "stowage.dev/not-ready" "operator" "Exists" "effect" "NoSchedule") }}
{{- end }}
{{- end }}
{{- if $tolerations }}
{{- toYaml $tolerations }}
{{- end }}
{{- end }}
