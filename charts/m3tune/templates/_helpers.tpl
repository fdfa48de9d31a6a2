{{- /*
An image reference from {repository, tag, digest}: repository@digest when a digest is given (the tag, if any,
kept before it for people reading it; the digest is what the kubelet pulls), else repository:tag, the tag
defaulting to the chart's appVersion. A tag can be moved to other bytes; a digest cannot.
Call: include "m3tune.image" (dict "image" .Values.images.cpu "default" .Chart.AppVersion)
*/ -}}
{{- define "m3tune.image" -}}
{{- $tag := .image.tag | default .default -}}
{{- if .image.digest -}}
{{- printf "%s%s@%s" .image.repository (ternary (printf ":%s" $tag) "" (ne $tag "")) .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "m3tune.labels" -}}
app.kubernetes.io/part-of: m3tune
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: m3tune-{{ .Chart.Version }}
{{- end -}}
