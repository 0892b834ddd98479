{{/*
The Ray Serve config of the RayService (serveConfigV2): files/serve-config.yaml, the
one Serve config of Parley, with the values merged in. Every application of the file
is kept, whatever their names; overrides must name applications and deployments the
file has. Failures name the value at fault.

"parley.serveConfig.json" is the merged config as JSON (for the other templates),
"parley.serveConfig" the YAML string that goes into serveConfigV2.
*/}}

{{/* Recursive merge of .src into the map .dst (mutated): maps merge, anything else
replaces, including false, 0 and "" (sprig's mergeOverwrite would skip those). */}}
{{- define "parley.deepMerge" -}}
{{- $dst := .dst -}}
{{- range $k, $v := .src -}}
{{- $cur := get $dst $k -}}
{{- if and (kindIs "map" $v) (kindIs "map" $cur) -}}
{{- include "parley.deepMerge" (dict "dst" $cur "src" $v) -}}
{{- else -}}
{{- $_ := set $dst $k (deepCopy $v) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Names of the Ray custom resources a group declares (rayResources, or
rayStartParams.resources as KubeRay reads it: quoted JSON). */}}
{{- define "parley.ray.declaredResources" -}}
{{- $names := list -}}
{{- range $k, $_ := (default (dict) .rayResources) }}{{ $names = append $names $k }}{{ end -}}
{{- $raw := get (default (dict) .rayStartParams) "resources" -}}
{{- if $raw -}}
{{- $parsed := fromJson (trimAll "'\"` " (toString $raw)) -}}
{{- range $k, $_ := $parsed }}{{ if ne $k "Error" }}{{ $names = append $names $k }}{{ end }}{{ end -}}
{{- end -}}
{{- toJson $names -}}
{{- end -}}

{{/* Whether a group offers GPUs to Ray: num-gpus > 0, or a GPU resource limit
(KubeRay counts keys ending in "gpu" and nvidia.com/mig-<n>g.<m>gb). */}}
{{- define "parley.ray.hasGpu" -}}
{{- $gpu := false -}}
{{- $params := default (dict) .rayStartParams -}}
{{- if hasKey $params "num-gpus" -}}
{{- $gpu = gt (float64 (get $params "num-gpus")) 0.0 -}}
{{- else -}}
{{- $limits := default (dict) (default (dict) .resources).limits -}}
{{- range $k, $q := $limits -}}
{{- if and (or (hasSuffix "gpu" $k) (regexMatch "nvidia\\.com/mig-[0-9]+g\\.[0-9]+gb$" $k)) (ne (toString $q) "0") -}}
{{- $gpu = true -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $gpu -}}
{{- end -}}

{{- define "parley.serveConfig.json" -}}
{{- $raw := .Files.Get "files/serve-config.yaml" -}}
{{- if not $raw -}}
{{- fail "files/serve-config.yaml is missing or empty: the chart deploys the Serve config it holds" -}}
{{- end -}}
{{- $cfg := fromYaml $raw -}}
{{- if hasKey $cfg "Error" -}}
{{- fail (printf "files/serve-config.yaml is not valid YAML: %s" (get $cfg "Error")) -}}
{{- end -}}
{{- $apps := get $cfg "applications" -}}
{{- if or (not (kindIs "slice" $apps)) (not $apps) -}}
{{- fail "files/serve-config.yaml: `applications` must be a non-empty list" -}}
{{- end -}}
{{- $serve := .Values.serve -}}

{{- /* Cluster-wide options. */ -}}
{{- $_ := set $cfg "proxy_location" $serve.proxyLocation -}}
{{- $http := default (dict) (get $cfg "http_options") -}}
{{- $_ := set $http "host" $serve.http.host -}}
{{- $_ := set $http "port" $serve.http.port -}}
{{- $_ := set $cfg "http_options" $http -}}
{{- $grpc := default (dict) (get $cfg "grpc_options") -}}
{{- $_ := set $grpc "port" $serve.grpc.port -}}
{{- $_ := set $cfg "grpc_options" $grpc -}}

{{- /* Every override must name an application of the file. */ -}}
{{- $appNames := list -}}
{{- range $app := $apps -}}
{{- if has $app.name $appNames -}}
{{- fail (printf "files/serve-config.yaml: application %q appears twice" $app.name) -}}
{{- end -}}
{{- $appNames = append $appNames $app.name -}}
{{- end -}}
{{- $overrides := default (dict) $serve.applications -}}
{{- range $name, $_ := $overrides -}}
{{- if not (has $name $appNames) -}}
{{- fail (printf "serve.applications.%s: files/serve-config.yaml has no application named %q (it has: %s)" $name $name (join ", " $appNames)) -}}
{{- end -}}
{{- end -}}

{{- /* Resources the Ray groups offer, to check what replicas ask for. */ -}}
{{- $declared := fromJsonArray (include "parley.ray.declaredResources" .Values.head) -}}
{{- $gpuGroups := list -}}
{{- range $gname, $g := .Values.workerGroups -}}
{{- if $g.enabled -}}
{{- $declared = concat $declared (fromJsonArray (include "parley.ray.declaredResources" $g)) -}}
{{- if eq (include "parley.ray.hasGpu" $g) "true" }}{{ $gpuGroups = append $gpuGroups $gname }}{{ end -}}
{{- end -}}
{{- end -}}

{{- range $app := $apps -}}
{{- $ov := default (dict) (get $overrides $app.name) -}}
{{- $path := printf "serve.applications.%s" $app.name -}}
{{- with $ov.args -}}
{{- $args := default (dict) (get $app "args") -}}
{{- include "parley.deepMerge" (dict "dst" $args "src" .) -}}
{{- $_ := set $app "args" $args -}}
{{- end -}}
{{- with $ov.runtime_env -}}
{{- $env := default (dict) (get $app "runtime_env") -}}
{{- include "parley.deepMerge" (dict "dst" $env "src" .) -}}
{{- $_ := set $app "runtime_env" $env -}}
{{- end -}}
{{- $deployments := default (list) (get $app "deployments") -}}
{{- $depNames := list -}}
{{- range $d := $deployments }}{{ $depNames = append $depNames $d.name }}{{ end -}}
{{- $depOverrides := default (dict) $ov.deployments -}}
{{- range $dname, $_ := $depOverrides -}}
{{- if not (has $dname $depNames) -}}
{{- fail (printf "%s.deployments.%s: application %q of files/serve-config.yaml lists no deployment named %q (it lists: %s); add it to the file first" $path $dname $app.name $dname (join ", " $depNames)) -}}
{{- end -}}
{{- end -}}
{{- range $d := $deployments -}}
{{- $dpath := printf "%s.deployments.%s" $path $d.name -}}
{{- $dov := get $depOverrides $d.name -}}
{{- if $dov -}}
{{- /* A fixed replica count and autoscaling exclude each other in Serve. */ -}}
{{- if and (hasKey $dov "num_replicas") (ne (toString $dov.num_replicas) "auto") (not (hasKey $dov "autoscaling_config")) -}}
{{- $_ := unset $d "autoscaling_config" -}}
{{- end -}}
{{- if and (hasKey $dov "autoscaling_config") (not (hasKey $dov "num_replicas")) (hasKey $d "num_replicas") (ne (toString $d.num_replicas) "auto") -}}
{{- $_ := unset $d "num_replicas" -}}
{{- end -}}
{{- include "parley.deepMerge" (dict "dst" $d "src" $dov) -}}
{{- end -}}
{{- with $d.autoscaling_config -}}
{{- /* Serve's defaults: 1 and 1 (0 is a valid minimum, so no `default` here). */ -}}
{{- $min := 1.0 -}}{{- if hasKey . "min_replicas" }}{{ $min = float64 .min_replicas }}{{ end -}}
{{- $max := 1.0 -}}{{- if hasKey . "max_replicas" }}{{ $max = float64 .max_replicas }}{{ end -}}
{{- if gt $min $max -}}
{{- fail (printf "%s.autoscaling_config: min_replicas (%v) exceeds max_replicas (%v)" $dpath $min $max) -}}
{{- end -}}
{{- if and (hasKey . "initial_replicas") (not (kindIs "invalid" .initial_replicas)) -}}
{{- if or (lt (float64 .initial_replicas) $min) (gt (float64 .initial_replicas) $max) -}}
{{- fail (printf "%s.autoscaling_config: initial_replicas (%v) lies outside [min_replicas, max_replicas]" $dpath .initial_replicas) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- with $d.ray_actor_options -}}
{{- range $res, $_ := (default (dict) .resources) -}}
{{- if not (has $res $declared) -}}
{{- fail (printf "%s.ray_actor_options.resources asks for the Ray resource %q, which no Ray group declares: its replicas would stay pending. Declare it in the rayResources of a worker group (e.g. workerGroups.gpu.rayResources: {%q: 1})" $dpath $res $res) -}}
{{- end -}}
{{- end -}}
{{- if and .num_gpus (gt (float64 .num_gpus) 0.0) (not $gpuGroups) -}}
{{- fail (printf "%s.ray_actor_options.num_gpus is %v but no enabled worker group has GPUs (a GPU resource limit such as nvidia.com/gpu, or rayStartParams.num-gpus): its replicas would stay pending" $dpath .num_gpus) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- /* Redis for the application that keeps API keys (the sessions gateway). */ -}}
{{- include "parley.redis.check" . -}}
{{- $rc := .Values.redis.serveConfig -}}
{{- range $app := $apps -}}
{{- if eq $app.name $rc.application -}}
{{- $userConfig := default (dict) (default (dict) (get $overrides $app.name)).args -}}
{{- if hasKey (default (dict) (get $userConfig "config")) $rc.urlField -}}
{{- fail (printf "serve.applications.%s.args.config.%s: set the Redis URL with redis.internal.enabled, redis.external.url or redis.external.existingSecret, not here" $app.name $rc.urlField) -}}
{{- end -}}
{{- $args := default (dict) (get $app "args") -}}
{{- $config := default (dict) (get $args "config") -}}
{{- /* Known and password-free: in the config. From a Secret: only in the pods'
$PARLEY_REDIS_URL (never a local default from the file). */ -}}
{{- $_ := set $config $rc.urlField (include "parley.redis.url" $) -}}
{{- with $.Values.redis.prefix }}{{ $_ := set $config $rc.prefixField . }}{{ end -}}
{{- $_ := set $args "config" $config -}}
{{- $_ := set $app "args" $args -}}
{{- end -}}
{{- end -}}
{{- toJson $cfg -}}
{{- end -}}

{{- define "parley.serveConfig" -}}
{{- include "parley.serveConfig.json" . | fromJson | toYaml -}}
{{- end -}}
