{{/* The chart name, overridable with nameOverride. */}}
{{- define "datacredit.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every resource name: fullnameOverride, or <release>-<chart> (just <release> if it contains the chart name). */}}
{{- define "datacredit.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Common labels. */}}
{{- define "datacredit.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "datacredit.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: datacredit
{{- end }}

{{/* Labels that select the operator pod. */}}
{{- define "datacredit.selectorLabels" -}}
app.kubernetes.io/name: {{ include "datacredit.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The operator's ServiceAccount name. */}}
{{- define "datacredit.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "datacredit.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image reference (tag defaults to the chart's appVersion; a digest wins over the tag). */}}
{{- define "datacredit.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The metrics Service name; Prometheus' `job` label when scraped through the ServiceMonitor. */}}
{{- define "datacredit.metricsServiceName" -}}
{{- printf "%s-metrics" (include "datacredit.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The PromQL label matchers that select the operator's scrape target (for the "operator down" alert). */}}
{{- define "datacredit.operatorSelector" -}}
{{- default (printf "job=%q, namespace=%q" (include "datacredit.metricsServiceName" .) .Release.Namespace) .Values.prometheusRule.operatorSelector }}
{{- end }}

{{/*
The namespaced rules the operator needs wherever it reconciles ValuationRuns
(a ClusterRole when cluster-wide, a Role per namespace otherwise).
*/}}
{{- define "datacredit.namespacedRules" -}}
- apiGroups: ["datacredit.dev"]
  resources: ["valuationruns"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["datacredit.dev"]
  resources: ["valuationruns/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "delete", "patch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- if .Values.rbac.peering }}
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end }}
