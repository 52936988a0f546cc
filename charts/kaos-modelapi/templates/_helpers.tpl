{{/* Names, labels and the RBAC rules shared by the templates. */}}

{{- define "kaos-modelapi.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: the release name, with the chart name unless the release name holds it. */}}
{{- define "kaos-modelapi.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "kaos-modelapi.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kaos-modelapi.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels of every object of the release. Never `app.kubernetes.io/managed-by: kaos-modelapi`: that label
marks the children the operator owns, and the operator's own objects must stay out of its caches.
*/}}
{{- define "kaos-modelapi.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kaos-modelapi.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: controller
app.kubernetes.io/part-of: kaos
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "kaos-modelapi.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kaos-modelapi.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator's ServiceAccount, as an RBAC subject list. */}}
{{- define "kaos-modelapi.subjects" -}}
- kind: ServiceAccount
  name: {{ include "kaos-modelapi.serviceAccountName" . }}
  namespace: {{ .Release.Namespace }}
{{- end }}

{{- define "kaos-modelapi.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
What the operator does through the API, least privilege (config/rbac/role.yaml holds the same rules;
tests/test_packaging.py checks they stay identical). Secrets: the operator creates the generated LiteLLM
master key and watches Secrets metadata-only (it never reads Secret data, which RBAC cannot express).
*/}}
{{- define "kaos-modelapi.managerRules" -}}
- apiGroups: ["kaos.tools"]
  resources: ["modelapis"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["kaos.tools"]
  resources: ["modelapis/status"]
  verbs: ["patch"]
- apiGroups: ["kaos.tools"]
  resources: ["modelapis/finalizers"]
  verbs: ["update"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# The tail of a pull-model init container's log, for the progress of a model pull (only while it runs).
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["gateway.networking.k8s.io"]
  resources: ["httproutes"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/*
The Lease of leader election, in the release namespace only. The elector reads it by name and writes it with
server-side apply (PATCH); `create` cannot be limited to a name (the object does not exist yet).
*/}}
{{- define "kaos-modelapi.leaderElectionRules" -}}
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["create"]
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  resourceNames: [{{ .Values.leaderElection.id | quote }}]
  verbs: ["get", "patch"]
{{- end }}
