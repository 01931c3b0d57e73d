// llmpods gateway: API key check, readiness, and the answer to a rejected request.
//
// Written for njs 0.7 (the version Debian bookworm ships): each request runs in a fresh copy of the
// JavaScript VM, so nothing a request stores in a global survives it. State that must outlive a
// request (the readiness latch) lives in a file under the run directory.
//
// nginx.conf passes the settings as variables:
//   $llmpods_model          the model id the backend must list
//   $llmpods_keys_file      the API keys, one per line; blank lines and lines starting with # are ignored
//   $llmpods_ready_marker   the readiness latch file
//   $llmpods_bearer_token   the token of "Authorization: Bearer <token>", or ""

import fs from 'fs';

const AUTH_CHALLENGE = 'Bearer realm="llmpods"';

function readKeys(path) {
    const lines = fs.readFileSync(path, 'utf8').split('\n');
    const keys = [];
    for (let i = 0; i < lines.length; i++) {
        const line = lines[i].trim();
        if (line.length > 0 && line[0] !== '#') {
            keys.push(line);
        }
    }
    return keys;
}

// 1 when a and b are equal. Takes the same time wherever they differ (the length is not hidden).
function same(a, b) {
    if (a.length !== b.length) {
        return 0;
    }
    let diff = 0;
    for (let i = 0; i < a.length; i++) {
        diff |= a.charCodeAt(i) ^ b.charCodeAt(i);
    }
    return diff === 0 ? 1 : 0;
}

// js_set handler: "1" when the bearer token is one of the keys. The keys file is read on every
// request, so a key added to or removed from it counts from the next request on.
function keyOk(r) {
    const token = r.variables.llmpods_bearer_token;
    if (!token) {
        return '0';
    }
    let keys;
    try {
        keys = readKeys(r.variables.llmpods_keys_file);
    } catch (e) {
        r.error(`llmpods: cannot read the API keys file ${r.variables.llmpods_keys_file}: ${e.message}`);
        return '0';
    }
    let found = 0;
    for (let i = 0; i < keys.length; i++) {
        found |= same(token, keys[i]);
    }
    return found ? '1' : '0';
}

function sendJson(r, status, body) {
    r.headersOut['Content-Type'] = 'application/json';
    r.headersOut['Cache-Control'] = 'no-store';
    r.return(status, JSON.stringify(body) + '\n');
}

function apiError(message, type, code) {
    return { error: { message: message, type: type, param: null, code: code } };
}

// error_page 400 handler. nginx itself rejects a request with two Authorization headers with 400;
// that is an authentication failure, so it gets the same answer as a wrong key.
function badRequest(r) {
    let authorizations = 0;
    const raw = r.rawHeadersIn;
    for (let i = 0; i < raw.length; i++) {
        if (raw[i][0].toLowerCase() === 'authorization') {
            authorizations++;
        }
    }
    if (authorizations > 1) {
        r.headersOut['WWW-Authenticate'] = AUTH_CHALLENGE;
        sendJson(r, 401, apiError('Send exactly one Authorization header: Authorization: Bearer <key>',
            'invalid_request_error', 'invalid_api_key'));
        return;
    }
    sendJson(r, 400, apiError('Bad request.', 'invalid_request_error', null));
}

function latched(marker) {
    try {
        fs.accessSync(marker);
        return true;
    } catch (e) {
        return false;
    }
}

function latch(r, marker) {
    try {
        fs.writeFileSync(marker, `${r.variables.llmpods_model}\n`);
    } catch (e) {
        r.error(`llmpods: cannot write the readiness latch ${marker}: ${e.message}`);
    }
}

function unlatch(r, marker) {
    try {
        fs.unlinkSync(marker);
    } catch (e) {
        r.error(`llmpods: cannot remove the readiness latch ${marker}: ${e.message}`);
    }
}

function hasKeys(r) {
    try {
        return readKeys(r.variables.llmpods_keys_file).length > 0;
    } catch (e) {
        return false;
    }
}

function listedModels(text) {
    const ids = [];
    const data = JSON.parse(text).data;
    for (let i = 0; i < data.length; i++) {
        ids.push(data[i].id);
    }
    return ids;
}

// Readiness (/alive).
// Before the first success: GET /v1/models on the backend must list the model. That call waits on
// the backend's model lock, which is free while nothing is generating yet.
// After it (latched): a path the backend does not serve. Its 404 comes from the web framework
// without the model lock, so a running generation neither delays this check nor is interrupted by
// it. Connection refused or a timeout drops the latch: 503, and the next check lists models again.
async function alive(r) {
    const model = r.variables.llmpods_model;
    const marker = r.variables.llmpods_ready_marker;

    if (!hasKeys(r)) {
        sendJson(r, 503, {
            status: 'no_keys', model: model,
            message: `no API key in ${r.variables.llmpods_keys_file}`,
        });
        return;
    }

    if (latched(marker)) {
        const probe = await r.subrequest('/_llmpods/probe');
        if (probe.status < 500) {
            sendJson(r, 200, { status: 'ready', model: model });
            return;
        }
        unlatch(r, marker);
        sendJson(r, 503, {
            status: 'unavailable', model: model,
            message: `the inference backend stopped answering (gateway status ${probe.status})`,
        });
        return;
    }

    const reply = await r.subrequest('/_llmpods/models');
    if (reply.status !== 200) {
        sendJson(r, 503, {
            status: 'loading', model: model,
            message: `GET /v1/models on the inference backend: status ${reply.status}`,
        });
        return;
    }
    let ids;
    try {
        ids = listedModels(reply.responseText);
    } catch (e) {
        sendJson(r, 503, {
            status: 'loading', model: model,
            message: `GET /v1/models on the inference backend: unexpected answer (${e.message})`,
        });
        return;
    }
    if (ids.indexOf(model) < 0) {
        sendJson(r, 503, {
            status: 'model_not_listed', model: model, listed: ids,
            message: `the inference backend does not serve model ${model}`,
        });
        return;
    }
    latch(r, marker);
    sendJson(r, 200, { status: 'ready', model: model });
}

export default { keyOk, alive, badRequest };
