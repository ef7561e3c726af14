{{/* Names, labels and the shared security settings. */}}
{{- define "kubedistill.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kubedistill.mlflowName" -}}
{{- printf "%s-mlflow" (include "kubedistill.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubedistill.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kubedistill.image" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}

{{/* Pod-level: non-root uid 1000, RuntimeDefault seccomp. */}}
{{- define "kubedistill.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Container-level: read-only root, no privilege escalation, no capabilities. */}}
{{- define "kubedistill.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 1000
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Host header patterns MLflow accepts: the service's in-cluster names, with and without
the port, localhost (port-forward), private pod IPs (kubelet probes send Host: <podIP>:port)
and extras. */}}
{{- define "kubedistill.mlflowAllowedHosts" -}}
{{- $svc := include "kubedistill.mlflowName" . -}}
{{- $ns := .Release.Namespace -}}
{{- $port := .Values.mlflow.port | toString -}}
{{- $hosts := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) "localhost" "127.0.0.1" -}}
{{- $out := list -}}
{{- range $hosts -}}
{{- $out = append $out . -}}
{{- $out = append $out (printf "%s:%s" . $port) -}}
{{- end -}}
{{- concat $out (list "10.*" "172.*" "192.168.*") .Values.mlflow.extraAllowedHosts | join "," -}}
{{- end -}}
