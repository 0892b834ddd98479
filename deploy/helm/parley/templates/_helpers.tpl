{{/*
Names and labels.
*/}}

{{- define "parley.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Fully qualified app name, at most 40 characters: KubeRay appends suffixes to the
RayService name for its clusters, pods and Services (63-character limit).
*/}}
{{- define "parley.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "parley.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "parley.selectorLabels" -}}
app.kubernetes.io/name: {{ include "parley.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "parley.labels" -}}
helm.sh/chart: {{ include "parley.chart" . }}
{{ include "parley.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: parley
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "parley.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "parley.serveServiceName" -}}
{{- printf "%s-serve" (include "parley.fullname" .) -}}
{{- end -}}

{{- define "parley.redisName" -}}
{{- printf "%s-redis" (include "parley.fullname" .) -}}
{{- end -}}

{{/*
Redis: the Secret and key holding the URL ($PARLEY_REDIS_URL), and the URL itself
when the chart knows it (in-chart Redis or redis.external.url). Fails unless exactly
one source is configured.
*/}}
{{- define "parley.redis.check" -}}
{{- $r := .Values.redis -}}
{{- $n := 0 -}}
{{- if $r.internal.enabled }}{{ $n = add1 $n }}{{ end -}}
{{- if $r.external.url }}{{ $n = add1 $n }}{{ end -}}
{{- if $r.external.existingSecret }}{{ $n = add1 $n }}{{ end -}}
{{- if ne (int $n) 1 -}}
{{- fail (printf "redis: configure exactly one source of the Redis URL (API keys live there): redis.internal.enabled=true, redis.external.url, or redis.external.existingSecret; %d are set" (int $n)) -}}
{{- end -}}
{{- if and $r.external.url (regexMatch "^[A-Za-z][A-Za-z0-9+.-]*://[^/@]*:[^/@]*@" $r.external.url) -}}
{{- fail "redis.external.url holds a password; it would be written in clear into the RayService (serveConfigV2). Put the URL in a Secret and set redis.external.existingSecret (and existingSecretKey) instead" -}}
{{- end -}}
{{- end -}}

{{- define "parley.redis.url" -}}
{{- if .Values.redis.internal.enabled -}}
{{- printf "redis://%s:6379/0" (include "parley.redisName" .) -}}
{{- else if .Values.redis.external.url -}}
{{- .Values.redis.external.url -}}
{{- end -}}
{{- end -}}

{{- define "parley.redis.secretName" -}}
{{- default (include "parley.redisName" .) .Values.redis.external.existingSecret -}}
{{- end -}}

{{- define "parley.redis.secretKey" -}}
{{- if .Values.redis.external.existingSecret -}}
{{- .Values.redis.external.existingSecretKey -}}
{{- else -}}
url
{{- end -}}
{{- end -}}

{{/*
Environment of every Ray container.
*/}}
{{- define "parley.ray.env" -}}
- name: PARLEY_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "parley.redis.secretName" . }}
      key: {{ include "parley.redis.secretKey" . }}
{{- with .Values.redis.prefix }}
- name: PARLEY_REDIS_PREFIX
  value: {{ . | quote }}
{{- end }}
# Serve's gRPC proxy would take messages up to 2 GiB; Parley's own servers take 4 MiB
# (parley.rpc.MAX_MESSAGE_BYTES): a bigger one ends RESOURCE_EXHAUSTED at the proxy.
- name: RAY_SERVE_GRPC_MAX_MESSAGE_SIZE
  value: "4194304"
# Libraries that cache files write under /tmp (the root filesystem is read-only).
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: MPLCONFIGDIR
  value: /tmp/.config/matplotlib
{{- with .Values.ray.env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Ray custom resources of a group as rayStartParams.resources: a single-quoted JSON
object, the form KubeRay itself writes (`ray start --resources='{"x": 1}'`).
*/}}
{{- define "parley.ray.startParams" -}}
{{- $params := deepCopy (default (dict) .group.rayStartParams) -}}
{{- if .group.rayResources -}}
{{- if hasKey $params "resources" -}}
{{- fail (printf "%s: set Ray custom resources either in rayResources or in rayStartParams.resources, not both" .path) -}}
{{- end -}}
{{- $_ := set $params "resources" (printf "'%s'" (toJson .group.rayResources)) -}}
{{- end -}}
{{- range $k, $v := .extra }}{{ if not (hasKey $params $k) }}{{ $_ := set $params $k $v }}{{ end }}{{ end -}}
{{- $strings := dict -}}
{{- range $k, $v := $params }}{{ $_ := set $strings $k (toString $v) }}{{ end -}}
{{- toYaml $strings -}}
{{- end -}}

{{/*
The Ray container's ports. `serve` and `serve-*` are the names KubeRay looks for
when it builds the Serve Service; `metrics` is what the PodMonitor scrapes.
*/}}
{{- define "parley.ray.servePorts" -}}
- {name: serve, containerPort: {{ .Values.serve.http.port }}, protocol: TCP}
- {name: serve-grpc, containerPort: {{ .Values.serve.grpc.port }}, protocol: TCP}
- {name: metrics, containerPort: 8080, protocol: TCP}
{{- end -}}

{{/*
Pod template of a Ray group. Arguments: root, group (values), kind (head|worker),
name (group name).
*/}}
{{- define "parley.ray.podTemplate" -}}
{{- $root := .root -}}
{{- $g := .group -}}
{{- $v := $root.Values -}}
metadata:
  labels:
    {{- include "parley.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ if eq .kind "head" }}ray-head{{ else }}ray-worker{{ end }}
    parley.dev/ray-group: {{ .name }}
    {{- with $v.ray.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- /* No checksum of the Serve config here: KubeRay applies serveConfigV2 changes in
  place, while any pod template change starts a new Ray cluster. */}}
  {{- with $v.ray.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- if eq .kind "head" }}
  {{- with $g.serviceAccountName }}
  serviceAccountName: {{ . }}
  {{- end }}
  {{- else }}
  # Workers call no Kubernetes API.
  automountServiceAccountToken: false
  {{- end }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.ray.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  terminationGracePeriodSeconds: {{ $v.ray.terminationGracePeriodSeconds }}
  securityContext:
    {{- toYaml $v.ray.podSecurityContext | nindent 4 }}
  {{- with $g.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    # KubeRay treats the first container as the Ray container.
    - name: {{ if eq .kind "head" }}ray-head{{ else }}ray-worker{{ end }}
      image: {{ include "parley.image" $root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      ports:
        {{- if eq .kind "head" }}
        - {name: gcs-server, containerPort: 6379, protocol: TCP}
        - {name: dashboard, containerPort: 8265, protocol: TCP}
        - {name: client, containerPort: 10001, protocol: TCP}
        {{- end }}
        {{- include "parley.ray.servePorts" $root | nindent 8 }}
      env:
        {{- include "parley.ray.env" $root | nindent 8 }}
        {{- with $g.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $v.ray.envFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      resources:
        {{- toYaml $g.resources | nindent 8 }}
      securityContext:
        {{- toYaml $v.ray.securityContext | nindent 8 }}
      {{- if $g.readinessProbe }}
      readinessProbe:
        {{- toYaml $g.readinessProbe | nindent 8 }}
      {{- else if and (eq .kind "worker") (eq $v.serve.proxyLocation "HeadOnly") }}
      # HeadOnly: workers run no Serve proxy, so KubeRay's default worker probe (which
      # also checks the proxy) would never pass; check the node's health only.
      readinessProbe:
        httpGet: {path: /api/healthz, port: 52365}
        initialDelaySeconds: 10
        periodSeconds: 5
        timeoutSeconds: 2
        failureThreshold: 10
      {{- end }}
      {{- with $g.livenessProbe }}
      livenessProbe:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - {name: tmp, mountPath: /tmp}
        {{- with $v.ray.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: tmp
      emptyDir:
        sizeLimit: {{ $v.ray.tmpSizeLimit }}
    {{- with $v.ray.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}
