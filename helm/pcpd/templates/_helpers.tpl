{{- define "pcpd.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pcpd.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "pcpd.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pcpd.secretName" -}}
{{- default (include "pcpd.fullname" .) .Values.secret.existingSecret -}}
{{- end -}}

{{/* The dataplane pcpd runs with: a dry-run Deployment never touches nftables. */}}
{{- define "pcpd.backend" -}}
{{- if eq .Values.mode "deployment" -}}memory{{- else -}}{{ .Values.dataplane.backend }}{{- end -}}
{{- end -}}

{{/* pcpd's own configuration file (docs/configuration.md). */}}
{{- define "pcpd.config" -}}
{{- $p := .Values.pcp -}}
listen: {{ toJson $p.listen }}
shards: {{ $p.shards }}
pcp:
  lifetimes:
    min: {{ $p.lifetimes.min }}
    max: {{ $p.lifetimes.max }}
    short_error: {{ $p.lifetimes.shortError }}
    long_error: {{ $p.lifetimes.longError }}
  pools:
    {{- range $name, $pool := $p.pools }}
    {{ $name }}:
      prefixes: {{ toJson $pool.prefixes }}
      ports: { first: {{ $pool.ports.first }}, last: {{ $pool.ports.last }} }
      block_size: {{ $pool.blockSize }}
      mode: {{ $pool.mode }}
      reuse_delay_secs: {{ $pool.reuseDelaySecs }}
      block_hold_secs: {{ $pool.blockHoldSecs }}
    {{- end }}
  profiles:
    {{- range $name, $prof := $p.profiles }}
    {{ $name }}:
      max_mappings: {{ $prof.maxMappings }}
      max_blocks: {{ $prof.maxBlocks }}
      rate_per_sec: {{ $prof.ratePerSec }}
      burst: {{ $prof.burst }}
    {{- end }}
  subscribers:
    {{- range $p.subscribers }}
    - prefixes: {{ toJson .prefixes }}
      {{- if .kind }}
      kind: {{ .kind }}
      {{- end }}
      {{- if .pool }}
      pool: {{ .pool }}
      {{- end }}
      profile: {{ .profile }}
    {{- end }}
  third_party:
    {{- range $p.thirdParty }}
    - from: {{ toJson .from }}
      for: {{ toJson .for }}
    {{- end }}
  options:
    prefer_failure: {{ $p.options.preferFailure }}
    filter: {{ $p.options.filter }}
    max_filters: {{ $p.options.maxFilters }}
    description: {{ $p.options.description }}
    port_set: {{ $p.options.portSet }}
    max_port_set: {{ $p.options.maxPortSet }}
    {{- with $p.options.prefix64 }}
    prefix64: {{ . }}
    {{- end }}
  natpmp: {{ $p.natpmp }}
  protocols: {{ toJson $p.protocols }}
  unsolicited:
    announce_count: {{ $p.unsolicited.announceCount }}
    update_count: {{ $p.unsolicited.updateCount }}
    announce_targets: {{ toJson $p.unsolicited.announceTargets }}
dataplane:
  backend: {{ include "pcpd.backend" . }}
  nftables:
    table: {{ .Values.dataplane.table }}
    firewall:
      unsolicited: {{ .Values.dataplane.firewall.unsolicited }}
      mark: {{ .Values.dataplane.firewall.mark | int64 }}
state_dir: /var/lib/pcpd
journal_max_mib: {{ .Values.journalMaxMib }}
journal_renewal_slack: {{ .Values.journalRenewalSlack }}
admin:
  listen: {{ printf "%s:%d" .Values.admin.bindAddress (int .Values.admin.port) | quote }}
  tls:
    cert: /etc/pcpd/secret/tls.crt
    key: /etc/pcpd/secret/tls.key
    {{- if .Values.admin.requireClientCert }}
    client_ca: /etc/pcpd/secret/ca.crt
    {{- end }}
  tokens: []
  tokens_file: /etc/pcpd/secret/tokens.yaml
metrics:
  listen: {{ printf "%s:%d" .Values.metrics.bindAddress (int .Values.metrics.port) | quote }}
log:
  format: {{ .Values.log.format }}
  {{- if .Values.log.natSinks }}
  nat_sinks:
    {{- toYaml .Values.log.natSinks | nindent 4 }}
  {{- else }}
  nat_events: {{ .Values.log.natEvents | quote }}
  {{- end }}
{{- with .Values.cluster }}
{{- if .enabled }}
{{- if not .etcd.endpoints }}{{ fail "cluster.etcd.endpoints: at least one endpoint is needed in cluster mode" }}{{ end }}
{{- if not .partitions }}{{ fail "cluster.partitions: at least one partition is needed in cluster mode" }}{{ end }}
cluster:
  # The node's name comes from $PCPD_NODE (the pod's spec.nodeName).
  etcd:
    endpoints: {{ toJson .etcd.endpoints }}
    prefix: {{ .etcd.prefix | quote }}
    timeout_ms: {{ .etcd.timeoutMs }}
    {{- if .etcd.tlsSecret }}
    tls:
      ca: /etc/pcpd/etcd/ca.crt
      {{- if .etcd.clientCert }}
      cert: /etc/pcpd/etcd/tls.crt
      key: /etc/pcpd/etcd/tls.key
      {{- end }}
    {{- end }}
  lease_ttl_secs: {{ .leaseTtlSecs }}
  margin_ms: {{ .marginMs }}
  renewal_slack: {{ .renewalSlack }}
  partitions:
    {{- range .partitions }}
    - name: {{ .name | quote }}
      subscribers: {{ toJson .subscribers }}
      pool: {{ .pool | quote }}
      external: {{ toJson .external }}
      prefer: {{ toJson (default (list) .prefer) }}
    {{- end }}
{{- end }}
{{- end }}
{{- end -}}
