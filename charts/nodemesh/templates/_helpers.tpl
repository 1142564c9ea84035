{{/* The image of the controller, the agent and the CNI installer: one image holds all three binaries. */}}
{{- define "nodemesh.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* Namespaces whose pods never depend on the agent: the configured ones and nodemesh's own. */}}
{{- define "nodemesh.excludedNamespaces" -}}
{{ append .Values.cni.excludeNamespaces .Release.Namespace | uniq | join "," }}
{{- end }}
