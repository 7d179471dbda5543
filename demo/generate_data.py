"""Deterministic data generator for the worked example: the access-policy assistant.

The assistant reads a short access incident ("stale key", "vendor wants admin", ...)
and answers with a one-line JSON object naming a decision, the governing policy id and
a one-sentence reply.  Everything here is synthetic and built from templates so that:

* the mapping is learnable by a 3-10M parameter model in a few hundred steps: each
  topic maps to exactly one policy id, and the decision is signalled by a clear cue
  sentence (e.g. "approved ticket ... attached" -> approve, "no ticket" -> request_evidence);
* the text still looks like real tickets: names, systems, key ids, ticket numbers,
  durations and paraphrased openers/closers vary from row to row;
* the output is byte-identical for a given seed (a single ``random.Random`` drives all
  choices, no set/dict-order or clock dependence), so data hashes can be locked.

Usage::

    python demo/generate_data.py --out data/access_policy --seed 7

Outputs (written atomically, ``<file>.tmp`` then ``os.replace``):
    sft_rows.jsonl     prompt/completion rows, several per thread, ~1% deliberately bad rows
    sft_threads.jsonl  multi-turn conversations (messages) for chat-template training
    corpus.jsonl       policy documents, runbooks, FAQs and incident write-ups for CPT
    README.md          short description of the files and fields

Standard library only, on purpose: the generator must run before any ML dependency
is installed (e.g. in CI data checks).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import sys
from pathlib import Path

# --------------------------------------------------------------------------------------
# Fixed vocabularies
# --------------------------------------------------------------------------------------

DECISIONS = ("request_evidence", "escalate", "deny", "approve", "revoke")

TENANTS = ["acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "wonka",
           "tyrell", "soylent", "cyberdyne", "vandelay"]
FIRST_NAMES = ["Priya", "Marcus", "Elena", "Tomasz", "Aisha", "Kenji", "Sofia", "Daniel",
               "Fatima", "Lucas", "Mei", "Omar", "Hannah", "Diego", "Ingrid", "Ravi", "Chloe",
               "Samuel", "Yara", "Noah", "Zara", "Felix", "Amara", "Jonas", "Leila", "Victor"]
LAST_NAMES = ["Patel", "Okafor", "Novak", "Schmidt", "Kim", "Garcia", "Haddad", "Larsen",
              "Moreau", "Tanaka", "Silva", "Brennan", "Kowalski", "Nguyen", "Ahmed", "Rossi"]
SYSTEMS = ["the AWS prod account", "the GitHub org", "Snowflake", "Salesforce",
           "the Jenkins controller", "the payments Kubernetes cluster", "HashiCorp Vault",
           "the billing Postgres database", "Datadog", "Okta", "the Workday tenant",
           "the data lake S3 buckets", "the CI runners", "the GCP analytics project",
           "Azure AD", "Zendesk", "the Jira instance", "the VPN gateway"]
LOCATIONS = ["an IP address in a country we do not operate in", "an unfamiliar IP address",
             "a Tor exit node", "a new device in another country", "a residential proxy",
             "an unknown hosting provider"]
VENDORS = ["Northwind Consulting", "Contoso Support", "Fabrikam Analytics",
           "Blue Yonder Partners", "Lumen Audit", "Quantum Payroll Services", "Apex SecOps"]
SERVICE_ACCOUNTS = ["svc-deploy", "svc-etl-nightly", "svc-backup", "svc-reporting",
                    "svc-terraform", "svc-monitoring", "svc-billing-sync", "svc-ml-train"]
ROLES = ["org admin", "prod DBA", "cluster-admin", "billing admin", "domain admin",
         "Owner", "security admin", "root"]
SHARED_ACCOUNTS = ["ops-shared", "finance-team", "support-desk", "qa-generic",
                   "warehouse-kiosk", "marketing-social"]
TEAMS = ["finance", "support", "data science", "sales ops", "platform", "payroll",
         "marketing", "warehouse"]
DATASETS = ["customers", "payments", "orders", "payroll", "patient_records",
            "support_tickets", "invoices"]
TICKET_PREFIXES = ["CHG", "REQ", "SEC", "ACC"]
MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]

# Paraphrase material for the user message.  Openers end with sentence punctuation so
# the following (capitalised) situation sentence always reads naturally.
OPENERS = ["", "", "", "Hi team!", "Hello.", "Quick one.", "Hey security team.",
           "Hi, {tenant} IT here.", "Case {case}.", "Morning all.", "Need help:",
           "Question from the {team} team."]
CLOSERS = ["", "", "What should we do?", "Please advise.", "How should we proceed?",
           "Can you confirm the next step?", "Thanks!", "Need a decision today.",
           "Let me know.", "Is this ok?"]
FOLLOWUP_OPENERS = ["Update on {ref}.", "Following up on {ref}.", "Re: {ref}.",
                    "Another update about {ref}.", "Back again about {ref}.",
                    "New info on {ref}."]

# --------------------------------------------------------------------------------------
# Topics.  One topic == one policy id.  For every decision a topic allows we list cue
# sentences (what the user says) and reply sentences (what the assistant says).  The
# cue vocabulary is deliberately consistent across topics so a tiny model can pick it up:
#   approve          -> "approved ticket {ticket} ... attached" / signed attestation
#   request_evidence -> "no ticket", "not verified", "no record"
#   deny             -> a request the policy forbids outright (never expire, share password,
#                       self-approval, permanent admin, copy to personal device)
#   revoke           -> left / contract ended / unused / leaked / no longer needed
#   escalate         -> suspicious or unexplained activity, unfamiliar location
# --------------------------------------------------------------------------------------

TOPICS = [
    {
        "key": "stale_keys", "policy": "AC-101", "title": "Stale Credential Rotation",
        "noun": "stale access keys",
        "subjects": [
            "Access key {key} for {system}, owned by {name}, was flagged as stale by the weekly credential scan.",
            "The credential scanner marked {name}'s API key {key} on {system} as stale.",
            "We found a stale access key {key} belonging to {name} in {system}.",
        ],
        "refs": ["the stale key {key} on {system}", "{name}'s stale access key {key}"],
        "cues": {
            "revoke": [
                "It has been unused for {days} days and {name} has not answered two reminders.",
                "Nobody has used it in {days} days and the owner says it is no longer needed.",
                "Last use was {days} days ago and no owner response came back.",
            ],
            "request_evidence": [
                "{name} says it is still needed, but there is no ticket or justification attached.",
                "The owner wants to keep it, but no exception ticket has been filed yet.",
            ],
            "approve": [
                "{name} needs it for a quarterly export and the approved exception ticket {ticket} is attached.",
                "The owner attached approved exception ticket {ticket} to keep it until the next rotation.",
            ],
            "escalate": [
                "Last night it was suddenly used from {loc} after months of silence.",
                "It just authenticated from {loc}, which looks suspicious.",
            ],
        },
        "replies": {
            "revoke": [
                "Revoke key {key} now, because {pid} requires credentials unused for more than 90 days to be disabled when the owner cannot justify them.",
                "Disable and delete the stale key on {system}, since {pid} does not allow credentials to sit unused beyond 90 days without a justification.",
            ],
            "request_evidence": [
                "Please attach an approved exception ticket before we keep this key, since {pid} requires written justification for any credential unused beyond 90 days.",
                "We need an approved exception ticket from {name} first, because {pid} only lets stale keys stay active with documented justification.",
            ],
            "approve": [
                "Approved under {pid}: the key may stay active until its next rotation because the exception ticket {ticket} is approved and attached.",
                "Keeping the key is approved per {pid}, since approved exception ticket {ticket} documents why it is still needed until rotation.",
            ],
            "escalate": [
                "Escalating to the security on-call now, because {pid} treats sudden use of a stale credential from an unfamiliar location as a possible compromise.",
                "This goes to the security incident queue immediately, since {pid} says unexpected activity on a stale key must be investigated as a compromise.",
            ],
        },
        "when": {
            "revoke": "the key has been unused for more than 90 days and the owner does not justify keeping it",
            "request_evidence": "the owner wants to keep the key but has not filed an exception ticket",
            "approve": "the owner attached an approved exception ticket explaining why the key is still needed",
            "escalate": "a stale key suddenly shows activity from an unfamiliar location",
        },
        "purpose": "Long-lived credentials that nobody uses are a silent liability: they are rarely monitored, often over-privileged, and are a favourite target after a laptop or repository leak. This policy keeps the number of dormant credentials close to zero.",
        "scope": "All access keys, API keys and personal access tokens issued to people in any production or corporate system, including cloud consoles, source control, data warehouses and SaaS admin panels.",
        "rules": [
            "A credential is stale when it has not been used for 90 days.",
            "Stale credentials are revoked unless the owner files an exception ticket that is approved by their manager.",
            "An exception lasts at most until the next scheduled rotation.",
            "Activity on a stale credential from an unfamiliar location is handled as a security incident.",
        ],
        "evidence": "An exception ticket in the change system that names the key, the business reason, the approving manager and the planned rotation date.",
        "escalation": "Unexpected use of a stale credential goes to the security on-call, who may disable the key before contacting the owner.",
    },
    {
        "key": "expired_keys", "policy": "AC-102", "title": "Credential Expiry and Renewal",
        "noun": "expired keys and renewals",
        "subjects": [
            "The signing key {key} used by {system} expired on {date}.",
            "{name} reports that their access key {key} for {system} has expired.",
            "Our certificate-backed key {key} for {system} passed its expiry date on {date}.",
        ],
        "refs": ["the expired key {key}", "the renewal of expired key {key} for {system}"],
        "cues": {
            "approve": [
                "{name} requested a renewal and the approved renewal ticket {ticket} is attached.",
                "The renewal request comes with approved ticket {ticket} signed off by {manager}.",
            ],
            "request_evidence": [
                "{name} wants it renewed today but no renewal ticket has been filed.",
                "They asked for a renewal without any ticket or manager approval.",
            ],
            "deny": [
                "{name} asks us to set the new key to never expire.",
                "The team wants the renewed key issued with no expiry date at all.",
            ],
            "escalate": [
                "The expired key is still being tried from {loc}, hundreds of times an hour.",
                "Logs show repeated suspicious login attempts with the expired key from {loc}.",
            ],
        },
        "replies": {
            "approve": [
                "Approved under {pid}: issue a renewed key with the standard one-year expiry, since renewal ticket {ticket} is approved and attached.",
                "Renewal is approved per {pid} because ticket {ticket} carries the required approval, so rotate the key with a fresh expiry date.",
            ],
            "request_evidence": [
                "Please file a renewal ticket with manager approval first, because {pid} requires an approved ticket before any expired credential is reissued.",
                "We cannot renew yet, because {pid} needs an approved renewal ticket naming the key and its owner before reissuing it.",
            ],
            "deny": [
                "Denied under {pid}: credentials must always carry an expiry date of at most one year, so a non-expiring key cannot be issued.",
                "This request is denied because {pid} forbids issuing any key without an expiry date, however inconvenient regular rotation may be for the team.",
            ],
            "escalate": [
                "Escalating to the security on-call, because {pid} treats repeated attempts to use an expired credential from an unknown source as a possible attack.",
                "Routing this to the incident queue now, since {pid} requires suspicious use of an expired key to be investigated by security.",
            ],
        },
        "when": {
            "approve": "a renewal is requested with an approved renewal ticket attached",
            "request_evidence": "a renewal is requested without a ticket or manager approval",
            "deny": "someone asks for a key that never expires",
            "escalate": "an expired key is still being used or tried from an unknown source",
        },
        "purpose": "Every credential must have a bounded lifetime so that a leaked secret eventually stops working even if nobody ever notices the leak.",
        "scope": "All keys, certificates and tokens issued by the identity platform, the secrets manager and the cloud providers.",
        "rules": [
            "Every credential carries an expiry date no later than one year after issue.",
            "Renewal requires an approved ticket from the owner's manager.",
            "Non-expiring credentials are never issued.",
            "Repeated use of an expired credential is investigated as a potential attack.",
        ],
        "evidence": "A renewal ticket naming the key, the owner, the system and the approving manager.",
        "escalation": "The security on-call reviews any expired credential that keeps being presented to a system.",
    },
    {
        "key": "privileged_role_changes", "policy": "AC-103", "title": "Privileged Role Changes",
        "noun": "privileged role changes",
        "subjects": [
            "{name} asked to be granted the {role} role on {system}.",
            "There is a request to add {name} to the {role} group in {system}.",
            "{manager} wants {name} promoted to {role} on {system}.",
        ],
        "refs": ["the {role} request for {name}", "{name}'s {role} role change on {system}"],
        "cues": {
            "approve": [
                "The approved change ticket {ticket} from {manager} and security is attached.",
                "Both manager and security approvals are recorded in the attached approved ticket {ticket}.",
            ],
            "request_evidence": [
                "There is no change ticket yet, just a chat message.",
                "No ticket was filed and nobody has approved it in writing.",
            ],
            "deny": [
                "{name} approved the request themselves in the ticket.",
                "The only approval on the ticket is from {name}, the requester.",
            ],
            "escalate": [
                "The role was already granted last night outside the change window and nobody knows who did it.",
                "Audit logs show the role was added unexpectedly with no request at all.",
            ],
        },
        "replies": {
            "approve": [
                "Approved under {pid}: grant the {role} role to {name}, since change ticket {ticket} carries both the manager and the security approval.",
                "The role change is approved per {pid} because the attached ticket {ticket} has the two approvals required for privileged access.",
            ],
            "request_evidence": [
                "Please file a change ticket with manager and security approval, because {pid} does not accept chat messages as evidence for privileged role changes.",
                "We need an approved change ticket before granting {role}, since {pid} requires written approval from the manager and security for every privileged role.",
            ],
            "deny": [
                "Denied under {pid}: requesters may never approve their own privileged access, so the manager and security must both approve the change instead.",
                "This is denied because {pid} forbids self-approval of privileged roles, even when the requester is already an administrator on the system.",
            ],
            "escalate": [
                "Escalating to the security on-call now, because {pid} treats an unexplained privileged role grant as a potential compromise that must be investigated.",
                "This goes straight to the incident queue, since {pid} requires any privileged change made without a request to be reviewed by security.",
            ],
        },
        "when": {
            "approve": "the change ticket carries approval from both the manager and security",
            "request_evidence": "there is no change ticket or written approval",
            "deny": "the requester approved their own privileged role",
            "escalate": "a privileged role appeared without any request or outside the change window",
        },
        "purpose": "Privileged roles can change configuration, read sensitive data and erase audit trails, so every grant must be deliberate, approved by two people and traceable.",
        "scope": "Administrator, owner, DBA, root and cluster-admin roles in production systems, identity providers and cloud accounts.",
        "rules": [
            "Every privileged role grant needs a change ticket approved by the requester's manager and by security.",
            "Nobody may approve their own privileged access.",
            "Grants happen inside the change window unless an incident is declared.",
            "Privileged roles that appear without a ticket are treated as a security incident.",
        ],
        "evidence": "A change ticket with two approvals (manager and security), the role, the system and the duration of the grant.",
        "escalation": "Unexplained privileged grants go to the security on-call, who can roll the change back immediately.",
    },
    {
        "key": "session_timeouts", "policy": "AC-104", "title": "Session Timeout Standard",
        "noun": "session timeout settings",
        "subjects": [
            "The {team} team asked to change the session timeout on {system}.",
            "{name} wants longer idle sessions on {system} because users keep getting logged out.",
            "We received a request about the session timeout settings for {system}.",
        ],
        "refs": ["the session timeout change for {system}", "the {system} session timeouts"],
        "cues": {
            "approve": [
                "They want an idle timeout of {hours} hours, within the 12-hour limit, and approved ticket {ticket} is attached.",
                "The new timeout stays inside the standard and approved ticket {ticket} is attached.",
            ],
            "request_evidence": [
                "They want a longer timeout but did not attach any ticket or approval.",
                "No ticket has been raised for the timeout change yet.",
            ],
            "deny": [
                "They want session timeouts disabled completely for all users.",
                "The ask is to let sessions stay logged in forever.",
            ],
            "escalate": [
                "Sessions are not expiring at all and we saw a session reused from {loc}.",
                "A session token was replayed from {loc} long after the user logged out.",
            ],
        },
        "replies": {
            "approve": [
                "Approved under {pid}: the new idle timeout stays within the 12-hour limit and ticket {ticket} records the required approval from the system owner.",
                "The timeout change is approved per {pid}, since it respects the 12-hour maximum and approved ticket {ticket} is attached.",
            ],
            "request_evidence": [
                "Please raise a ticket with the system owner's approval first, because {pid} requires an approved change record for any session timeout adjustment.",
                "We need an approved ticket before touching the timeout, since {pid} only allows documented and owner-approved changes to session settings.",
            ],
            "deny": [
                "Denied under {pid}: sessions must expire after at most 12 hours of inactivity, so disabling timeouts is not allowed.",
                "This is denied because {pid} forbids never-expiring sessions on any system that holds company data, so the 12-hour idle limit stays in place.",
            ],
            "escalate": [
                "Escalating to the security on-call, because {pid} treats a replayed or non-expiring session as a possible session hijack that needs investigation.",
                "This goes to the incident queue now, since {pid} requires suspicious session reuse to be investigated by security before anything else.",
            ],
        },
        "when": {
            "approve": "the new timeout stays within the 12-hour limit and an approved ticket is attached",
            "request_evidence": "a timeout change is requested without a ticket",
            "deny": "someone asks to disable session timeouts entirely",
            "escalate": "sessions are being reused or replayed from unexpected places",
        },
        "purpose": "Idle sessions left open on shared or stolen devices give an attacker access without any password. A consistent timeout limits that window.",
        "scope": "Interactive web and console sessions for all corporate and production systems, including SSO-backed SaaS applications.",
        "rules": [
            "Idle sessions expire after at most 12 hours; privileged consoles after 15 minutes.",
            "Changes to timeout settings need an approved ticket from the system owner.",
            "Session timeouts are never disabled.",
            "Replayed or non-expiring sessions are investigated as a possible hijack.",
        ],
        "evidence": "A ticket approved by the system owner stating the old and new timeout and the reason for the change.",
        "escalation": "Suspicious session reuse goes to the security on-call, who can force a global sign-out.",
    },
    {
        "key": "mfa_resets", "policy": "AC-105", "title": "MFA Reset Verification",
        "noun": "MFA resets",
        "subjects": [
            "{name} lost their phone and needs an MFA reset for {system}.",
            "We got an MFA reset request for {name}'s account on {system}.",
            "{name} is locked out of {system} and asks for their MFA device to be reset.",
        ],
        "refs": ["the MFA reset for {name}", "{name}'s MFA reset request"],
        "cues": {
            "approve": [
                "Their identity was verified on a video call and approved ticket {ticket} is attached.",
                "{manager} verified them in person and the approved reset ticket {ticket} is attached.",
            ],
            "request_evidence": [
                "We have not verified their identity yet and there is no ticket.",
                "The request came by email with no ticket and no identity check.",
            ],
            "deny": [
                "The request was made by a coworker on {name}'s behalf.",
                "{manager} asks us to reset it for {name} without {name} being present.",
            ],
            "escalate": [
                "The caller could not answer the verification questions and called from an unknown number.",
                "The reset request came from {loc} while {name} is sitting in the office.",
            ],
        },
        "replies": {
            "approve": [
                "Approved under {pid}: reset the MFA device for {name}, since identity was verified and the approved ticket {ticket} is attached.",
                "The MFA reset is approved per {pid} because the live identity verification is recorded in approved ticket {ticket}, so go ahead.",
            ],
            "request_evidence": [
                "Please verify identity on a video call and attach a ticket first, because {pid} requires both before any MFA reset.",
                "We need a verified identity check and a ticket before resetting anything, since {pid} treats MFA resets as high risk.",
            ],
            "deny": [
                "Denied under {pid}: MFA resets must be requested by the account owner in person, never by a coworker on their behalf.",
                "This is denied because {pid} does not allow anyone other than the account owner to request an MFA reset, not even a manager.",
            ],
            "escalate": [
                "Escalating to the security on-call, because {pid} treats a failed identity check on an MFA reset as a likely social engineering attempt.",
                "This goes to the incident queue now, since {pid} requires suspicious MFA reset requests to be reviewed by security before any reply.",
            ],
        },
        "when": {
            "approve": "identity was verified live and an approved ticket is attached",
            "request_evidence": "identity has not been verified or there is no ticket",
            "deny": "someone other than the account owner asks for the reset",
            "escalate": "the identity check fails or the request comes from an unexpected place",
        },
        "purpose": "MFA resets are the easiest way to take over an account through social engineering, so the helpdesk must be certain it is talking to the real owner.",
        "scope": "All MFA factors (authenticator apps, hardware keys, SMS) for every workforce identity.",
        "rules": [
            "The account owner must request the reset personally.",
            "Identity is verified on a live video call or in person before any reset.",
            "Every reset is recorded in an approved ticket.",
            "Failed verification or requests from unexpected locations are escalated to security.",
        ],
        "evidence": "A ticket recording who verified the identity, how, and when.",
        "escalation": "Suspicious reset requests go to the security on-call, who may lock the account until the owner is reached.",
    },
    {
        "key": "offboarding", "policy": "AC-106", "title": "Offboarding and Deprovisioning",
        "noun": "offboarding",
        "subjects": [
            "{name} from the {team} team is being offboarded and we are checking their {system} account.",
            "HR flagged {name} for offboarding and we are reviewing their access to {system}.",
            "We are processing the offboarding for {name}, who had access to {system}.",
        ],
        "refs": ["the offboarding of {name}", "{name}'s offboarding and {system} access"],
        "cues": {
            "revoke": [
                "Their last day was {date} and the HR termination record is attached.",
                "HR confirmed they left on {date}, but the account is still active.",
            ],
            "request_evidence": [
                "We have no HR termination record yet, only a message from a coworker.",
                "Nobody from HR has confirmed the departure and there is no ticket.",
            ],
            "escalate": [
                "Their account logged in from {loc} two days after their last day.",
                "We saw data downloads from their account after the termination date.",
            ],
            "approve": [
                "{manager} needs temporary access to their mailbox and approved ticket {ticket} is attached.",
                "Their manager asks for a 30-day mailbox delegation with approved ticket {ticket} attached.",
            ],
        },
        "replies": {
            "revoke": [
                "Revoke all of {name}'s access on {system} today, because {pid} requires deprovisioning within 24 hours of a confirmed departure.",
                "Disable the account and remove every entitlement now, since {pid} allows no access to remain after the HR-confirmed last day.",
            ],
            "request_evidence": [
                "Please attach the HR termination record first, because {pid} only allows deprovisioning based on a confirmed HR record with the last working day.",
                "We need written confirmation from HR before removing any access, since {pid} does not act on hearsay or chat messages about a departure.",
            ],
            "escalate": [
                "Escalating to the security on-call, because {pid} treats any activity on a departed user's account as a potential insider incident.",
                "This goes to the incident queue now, since {pid} requires activity after a termination date to be investigated by security.",
            ],
            "approve": [
                "Approved under {pid}: the manager gets time-limited mailbox delegation for 30 days, since ticket {ticket} is approved and attached.",
                "Mailbox delegation is approved per {pid} for 30 days only, because approved ticket {ticket} documents the business need and the manager.",
            ],
        },
        "when": {
            "revoke": "HR has confirmed the departure and access is still active",
            "request_evidence": "there is no HR termination record yet",
            "escalate": "the departed user's account shows activity after the last day",
            "approve": "a manager requests time-limited mailbox delegation with an approved ticket",
        },
        "purpose": "Access that outlives employment is one of the most common root causes of insider incidents and audit findings.",
        "scope": "Every account, group membership, key and token belonging to an employee or contractor who leaves the company.",
        "rules": [
            "All access is removed within 24 hours of the HR-confirmed last day.",
            "Deprovisioning is driven by the HR termination record, not by informal messages.",
            "Managers may receive mailbox delegation for at most 30 days with an approved ticket.",
            "Any activity on a departed user's account is investigated as a security incident.",
        ],
        "evidence": "The HR termination record with the last working day, plus a ticket for any delegation.",
        "escalation": "Activity after the termination date goes to the security on-call and to HR.",
    },
    {
        "key": "vendor_access", "policy": "AC-107", "title": "Third-Party and Vendor Access",
        "noun": "vendor access",
        "subjects": [
            "{vendor} is asking for access to {system} for a support engagement.",
            "Our vendor {vendor} needs an account on {system}.",
            "A consultant from {vendor} requested a login to {system}.",
        ],
        "refs": ["the {vendor} access to {system}", "vendor access for {vendor}"],
        "cues": {
            "approve": [
                "The access is limited to {short_days} days and approved ticket {ticket} with the signed contract is attached.",
                "The approved ticket {ticket} and the signed contract are attached, for {short_days} days only.",
            ],
            "request_evidence": [
                "There is no ticket or contract reference attached yet.",
                "They sent the request by email with no ticket and no signed contract.",
            ],
            "deny": [
                "They want permanent admin access with no end date.",
                "They ask for a standing admin account that never expires.",
            ],
            "revoke": [
                "Their contract ended on {date} but the account is still enabled.",
                "The engagement finished last month and the vendor no longer needs access.",
            ],
            "escalate": [
                "Their account is downloading bulk customer data at night from {loc}.",
                "We saw unusual bulk exports from the vendor account via {loc}.",
            ],
        },
        "replies": {
            "approve": [
                "Approved under {pid}: grant {vendor} time-boxed access for {short_days} days, since the signed contract and ticket {ticket} are attached.",
                "Vendor access is approved per {pid} for {short_days} days only, because approved ticket {ticket} includes the signed contract and a sponsor.",
            ],
            "request_evidence": [
                "Please attach a ticket and the signed contract first, because {pid} requires both before any vendor account is created.",
                "We need an approved ticket and a contract reference before granting anything, since {pid} covers every third-party login on our systems.",
            ],
            "deny": [
                "Denied under {pid}: vendor access must be time-limited and least privilege, so permanent admin accounts are never granted to third parties.",
                "This is denied because {pid} forbids standing administrator access for any third party, whatever the contract says about support needs.",
            ],
            "revoke": [
                "Revoke the {vendor} account now, because {pid} requires vendor access to end as soon as the contract or engagement ends.",
                "Disable the vendor login today, since {pid} does not allow third-party access to outlive the contract or engagement it was granted for.",
            ],
            "escalate": [
                "Escalating to the security on-call now, because {pid} treats bulk data movement by a vendor account as a potential data breach.",
                "This goes straight to the incident queue, since {pid} requires unusual vendor activity to be investigated by security immediately.",
            ],
        },
        "when": {
            "approve": "a signed contract and an approved ticket are attached and access is time-boxed",
            "request_evidence": "the ticket or contract reference is missing",
            "deny": "the vendor asks for permanent or standing admin access",
            "revoke": "the contract or engagement has ended",
            "escalate": "a vendor account moves data in bulk or logs in from unexpected places",
        },
        "purpose": "Third parties often need access to help us, but their accounts sit outside our HR processes and are a frequent entry point for attackers.",
        "scope": "Every account used by consultants, vendors, auditors, outsourced support and managed service providers.",
        "rules": [
            "Vendor access requires a signed contract and an approved ticket.",
            "Vendor access is time-boxed to the engagement, at most 90 days per grant.",
            "Vendors never receive standing administrator access.",
            "Vendor access ends when the contract or engagement ends.",
            "Bulk data movement by a vendor account is treated as a potential breach.",
        ],
        "evidence": "An approved ticket referencing the signed contract, the sponsor, the systems and the end date.",
        "escalation": "Unusual vendor activity goes to the security on-call and to the vendor's internal sponsor.",
    },
    {
        "key": "break_glass", "policy": "AC-108", "title": "Break-Glass Emergency Access",
        "noun": "break-glass access",
        "subjects": [
            "The break-glass admin account for {system} was used by {name}.",
            "{name} checked out the break-glass credentials for {system}.",
            "We got an alert that the emergency break-glass login on {system} was opened.",
        ],
        "refs": ["the break-glass use on {system}", "{name}'s break-glass session"],
        "cues": {
            "approve": [
                "It was during declared incident {inc} and the approved incident ticket {ticket} is attached.",
                "The on-call lead approved it for incident {inc} and ticket {ticket} is attached.",
            ],
            "request_evidence": [
                "{name} says there was an outage, but no incident ticket has been attached yet.",
                "There is no incident ticket linked to the session yet.",
            ],
            "escalate": [
                "Nobody declared an incident and {name} says they did not open it.",
                "It was opened at 3am from {loc} with no incident declared.",
            ],
            "revoke": [
                "Incident {inc} was closed yesterday but the break-glass session is still active.",
                "The emergency is over and the break-glass credentials were never checked back in.",
            ],
        },
        "replies": {
            "approve": [
                "Approved under {pid}: the break-glass use is justified by declared incident {inc}, and ticket {ticket} provides the required record.",
                "The emergency access is approved per {pid}, since it was tied to declared incident {inc} and the approved ticket {ticket} is attached.",
            ],
            "request_evidence": [
                "Please link the incident ticket to this session, because {pid} requires every break-glass use to be tied to a declared incident.",
                "We need the incident ticket before closing this out, since {pid} does not accept break-glass use without a documented emergency.",
            ],
            "escalate": [
                "Escalating to the security on-call immediately, because {pid} treats break-glass use without a declared incident as a potential compromise.",
                "This goes to the incident queue now, since {pid} requires unexplained emergency logins to be investigated by security at once.",
            ],
            "revoke": [
                "Revoke the break-glass session and rotate its password now, because {pid} requires emergency access to end when the incident closes.",
                "Close the emergency session and reseal the credentials today, since {pid} does not allow break-glass access to outlive its incident.",
            ],
        },
        "when": {
            "approve": "the use happened during a declared incident and the incident ticket is attached",
            "request_evidence": "the incident ticket is not linked yet",
            "escalate": "no incident was declared or the use cannot be explained",
            "revoke": "the incident is closed but the emergency access is still active",
        },
        "purpose": "Break-glass accounts bypass normal approvals so that we can recover from outages. Because they bypass controls, every use must be justified and short-lived.",
        "scope": "Emergency administrator accounts and sealed credentials for production systems, identity providers and cloud root accounts.",
        "rules": [
            "Break-glass access is used only during a declared incident.",
            "Every use is linked to the incident ticket within 24 hours.",
            "Credentials are rotated and resealed when the incident closes.",
            "Use without a declared incident is treated as a potential compromise.",
        ],
        "evidence": "The incident ticket, the name of the incident commander who approved the use, and the session log.",
        "escalation": "Unexplained break-glass use pages the security on-call and the head of infrastructure.",
    },
    {
        "key": "shared_accounts", "policy": "AC-109", "title": "Shared and Generic Accounts",
        "noun": "shared accounts",
        "subjects": [
            "The {team} team is using the shared account {shared} on {system}.",
            "{name} asked about the shared login {shared} for {system}.",
            "Our audit found the generic account {shared} in use on {system}.",
        ],
        "refs": ["the shared account {shared}", "the shared login {shared} on {system}"],
        "cues": {
            "deny": [
                "{name} wants to post the password in the team chat so everyone can use it.",
                "They ask to give the login to three new hires by sharing the password.",
            ],
            "revoke": [
                "The team that used it was disbanded and nobody owns it anymore.",
                "It has no named owner and was last used {days} days ago.",
            ],
            "request_evidence": [
                "They want an exception to keep it, but no ticket has been filed.",
                "{name} says it is needed for a legacy tool but there is no ticket.",
            ],
            "approve": [
                "The exception for the legacy kiosk has approved ticket {ticket} attached, with a named owner.",
                "Approved exception ticket {ticket} is attached, naming {name} as the owner.",
            ],
            "escalate": [
                "It logged in from two different countries within ten minutes, including {loc}.",
                "We saw a login to it from {loc} that no team member recognises.",
            ],
        },
        "replies": {
            "deny": [
                "Denied under {pid}: passwords for shared accounts may never be distributed, so each person needs their own named account instead.",
                "This is denied because {pid} forbids sharing credentials in chat or email, so please request named accounts for each user.",
            ],
            "revoke": [
                "Disable the shared account {shared} now, because {pid} requires any generic account without a named owner to be removed.",
                "Remove the generic login today, since {pid} does not allow ownerless shared accounts to stay active on any system.",
            ],
            "request_evidence": [
                "Please file an exception ticket with a named owner, because {pid} only permits shared accounts with an approved and documented exception.",
                "We need an approved exception ticket naming an owner first, since {pid} requires a single accountable person for every shared login.",
            ],
            "approve": [
                "Approved under {pid}: the shared account may stay as an exception, since ticket {ticket} is approved and names an accountable owner.",
                "The exception is approved per {pid} because approved ticket {ticket} documents the legacy need and names an accountable owner for it.",
            ],
            "escalate": [
                "Escalating to the security on-call, because {pid} treats unrecognised logins to a shared account as a potential compromise to investigate.",
                "This goes to the incident queue now, since {pid} requires impossible-travel logins on shared accounts to be investigated by security.",
            ],
        },
        "when": {
            "deny": "someone wants to distribute the shared password",
            "revoke": "the shared account has no named owner or is no longer used",
            "request_evidence": "an exception is requested without a ticket",
            "approve": "an approved exception ticket with a named owner is attached",
            "escalate": "the shared account shows logins nobody recognises",
        },
        "purpose": "Shared accounts destroy accountability: when several people use one login, nobody can tell who did what, and the password spreads far beyond its intended audience.",
        "scope": "Generic, team and role accounts on any system, including kiosks, social media tools and legacy applications.",
        "rules": [
            "Every person uses a named account; shared accounts exist only as approved exceptions.",
            "Each exception has an approved ticket and a named, accountable owner.",
            "Shared passwords are never posted in chat, email or wikis.",
            "Ownerless or unused shared accounts are disabled.",
        ],
        "evidence": "An approved exception ticket naming the owner, the users, the system and the reason a named account is impossible.",
        "escalation": "Unrecognised logins on a shared account go to the security on-call.",
    },
    {
        "key": "service_account_tokens", "policy": "AC-110", "title": "Service Account Token Management",
        "noun": "service account tokens",
        "subjects": [
            "The token for service account {svc} on {system} needs attention.",
            "{name} raised a question about the {svc} service account token on {system}.",
            "We are looking at the API token of service account {svc} in {system}.",
        ],
        "refs": ["the {svc} token", "service account {svc} on {system}"],
        "cues": {
            "revoke": [
                "The token was committed to a public GitHub repository this morning.",
                "The token showed up in a pasted log on a public forum.",
            ],
            "escalate": [
                "The token is being used from {loc}, outside our cloud ranges.",
                "We see calls with the token from {loc} that none of our jobs make.",
            ],
            "approve": [
                "A new scoped token is needed for the pipeline and approved ticket {ticket} is attached.",
                "The rotation to a new 90-day token has approved ticket {ticket} attached.",
            ],
            "request_evidence": [
                "{name} wants a new token minted but there is no ticket.",
                "A second token is requested with no ticket or owner approval.",
            ],
            "deny": [
                "They want a token with wildcard admin scope that never expires.",
                "The request is for a non-expiring token with full admin rights.",
            ],
        },
        "replies": {
            "revoke": [
                "Revoke and rotate the {svc} token immediately, because {pid} requires any exposed service token to be invalidated at once.",
                "Invalidate the leaked token now and issue a replacement, since {pid} treats any public exposure of a service secret as compromised.",
            ],
            "escalate": [
                "Escalating to the security on-call, because {pid} treats service token use from unknown networks as a potential credential theft.",
                "This goes to the incident queue now, since {pid} requires unexplained service token activity to be investigated by security.",
            ],
            "approve": [
                "Approved under {pid}: issue a scoped token for {svc} with a 90-day expiry, since ticket {ticket} is approved and attached.",
                "The new token is approved per {pid} because approved ticket {ticket} covers its scope, its owner and its 90-day lifetime.",
            ],
            "request_evidence": [
                "Please attach a ticket approved by the service owner, because {pid} requires one before any service account token is issued.",
                "We need an approved ticket naming the owner and scope first, since {pid} tracks every service token through the change system.",
            ],
            "deny": [
                "Denied under {pid}: service tokens must be scoped to least privilege and expire within 90 days, so wildcard non-expiring tokens are not allowed.",
                "This is denied because {pid} forbids non-expiring or wildcard-scope tokens for any service account, so request a scoped 90-day token instead.",
            ],
        },
        "when": {
            "revoke": "the token was exposed publicly",
            "escalate": "the token is used from networks our jobs never use",
            "approve": "a scoped, expiring token is requested with an approved ticket",
            "request_evidence": "a token is requested without a ticket or owner approval",
            "deny": "someone asks for a wildcard or non-expiring token",
        },
        "purpose": "Service accounts run unattended, so their tokens are rarely watched by a person. A leaked service token can give an attacker quiet, long-term access.",
        "scope": "API tokens, client secrets and keys used by service accounts, CI pipelines and automation.",
        "rules": [
            "Service tokens are scoped to least privilege and expire within 90 days.",
            "New tokens need an approved ticket from the service owner.",
            "Exposed tokens are revoked and rotated immediately.",
            "Token use from unknown networks is investigated as potential theft.",
        ],
        "evidence": "An approved ticket naming the service account, its owner, the scope and the expiry.",
        "escalation": "Unexplained token use goes to the security on-call, who may revoke the token before contacting the owner.",
    },
    {
        "key": "access_reviews", "policy": "AC-111", "title": "Periodic Access Reviews",
        "noun": "access reviews",
        "subjects": [
            "The quarterly access review for {system} is open and {manager} is the reviewer.",
            "{manager} is reviewing who has access to {system} this quarter.",
            "Our access review campaign for {system} flagged {name}'s account.",
        ],
        "refs": ["the {system} access review", "the access review for {name}"],
        "cues": {
            "revoke": [
                "{manager} marked {name}'s access as no longer needed.",
                "The reviewer confirmed {name} changed teams and no longer needs it.",
            ],
            "request_evidence": [
                "{manager} kept {name}'s access but gave no justification.",
                "The review was marked complete without any attestation or comments.",
            ],
            "escalate": [
                "The review is {overdue} days overdue and {manager} has not responded to reminders.",
                "The reviewer has ignored the campaign for {overdue} days.",
            ],
            "approve": [
                "{manager} attested that the access is still needed and the signed review {ticket} is attached.",
                "The signed attestation {ticket} from {manager} confirms the access is required.",
            ],
        },
        "replies": {
            "revoke": [
                "Remove {name}'s access to {system}, because {pid} requires access marked as not needed in a review to be revoked within five days.",
                "Revoke the entitlement now, since {pid} says anything the reviewer marks as unnecessary must be removed within five working days.",
            ],
            "request_evidence": [
                "Please ask the reviewer for a written justification, because {pid} requires every retained entitlement to be attested with a reason.",
                "We need an attestation with a written reason before closing the review, since {pid} does not accept blank approvals of retained access.",
            ],
            "escalate": [
                "Escalating to the reviewer's director, because {pid} requires access reviews that are overdue by more than fourteen days to be escalated.",
                "This goes up to the reviewer's director now, since {pid} does not let an access review stay overdue past fourteen days.",
            ],
            "approve": [
                "Approved under {pid}: the access stays in place, since the signed attestation {ticket} from the reviewer is attached to the review.",
                "Retaining the access is approved per {pid} because signed attestation {ticket} records why it is still needed for the role.",
            ],
        },
        "when": {
            "revoke": "the reviewer marked the access as no longer needed",
            "request_evidence": "access was kept without any attestation or justification",
            "escalate": "the review is overdue and the reviewer does not respond",
            "approve": "the reviewer attested with a signed review",
        },
        "purpose": "Access accumulates as people change roles. Periodic reviews by the people who know the work are the control that removes what is no longer needed.",
        "scope": "All production systems, financial systems and systems holding personal data, reviewed every quarter.",
        "rules": [
            "Every entitlement is reviewed quarterly by the user's manager or the system owner.",
            "Retained access needs a signed attestation with a reason.",
            "Access marked as not needed is revoked within five working days.",
            "Reviews overdue by more than fourteen days are escalated to the reviewer's director.",
        ],
        "evidence": "A signed attestation in the review tool, with a reason for each retained entitlement.",
        "escalation": "Overdue reviews go to the reviewer's director; suspicious findings go to the security on-call.",
    },
    {
        "key": "production_data_access", "policy": "AC-112", "title": "Production Data Access",
        "noun": "production data access",
        "subjects": [
            "{name} wants read access to the {dataset} table in production.",
            "There is a request from {name} to query {dataset} data on {system}.",
            "{name} asked for direct access to production {dataset} records.",
        ],
        "refs": ["the production {dataset} access for {name}", "{name}'s request for {dataset} data"],
        "cues": {
            "approve": [
                "The data owner approved it for {short_days} days and ticket {ticket} is attached.",
                "Approved ticket {ticket} from the data owner is attached, with masking enabled.",
            ],
            "request_evidence": [
                "There is no ticket and the data owner has not been asked.",
                "It came in through chat with no ticket or data owner approval.",
            ],
            "deny": [
                "They want to copy the full unmasked table to a personal laptop.",
                "They ask to export the raw customer records to a personal drive.",
            ],
            "escalate": [
                "The query logs show they already pulled the table last night without access.",
                "An unexpected bulk query on the table ran from {loc}.",
            ],
        },
        "replies": {
            "approve": [
                "Approved under {pid}: grant masked, read-only access for {short_days} days, since the data owner's approval is attached in ticket {ticket}.",
                "Read-only access is approved per {pid} because approved ticket {ticket} from the data owner is attached and masking stays on.",
            ],
            "request_evidence": [
                "Please get the data owner's approval in a ticket first, because {pid} requires it before anyone reads production data.",
                "We need an approved ticket from the data owner before granting any access, since {pid} protects every production dataset with personal data.",
            ],
            "deny": [
                "Denied under {pid}: production customer data may never be copied to personal devices or drives, even temporarily or in masked form.",
                "This is denied because {pid} forbids exporting unmasked production records outside managed systems, including personal laptops and drives.",
            ],
            "escalate": [
                "Escalating to the security on-call, because {pid} treats unauthorised or unexpected bulk reads of production data as a potential breach.",
                "This goes to the incident queue now, since {pid} requires unexplained production data access to be investigated by security.",
            ],
        },
        "when": {
            "approve": "the data owner approved time-limited, masked access in a ticket",
            "request_evidence": "there is no ticket or data owner approval",
            "deny": "someone wants to copy production data to a personal device or drive",
            "escalate": "production data was read without access or from an unexpected place",
        },
        "purpose": "Production data contains customer and employee information that we are legally obliged to protect; access must be minimal, approved by the data owner and auditable.",
        "scope": "Production databases, warehouses and exports containing customer, payment, health or payroll data.",
        "rules": [
            "Access to production data needs an approved ticket from the data owner.",
            "Access is read-only, masked by default and time-limited.",
            "Production data is never copied to personal devices or drives.",
            "Unexpected bulk reads are investigated as a potential breach.",
        ],
        "evidence": "An approved ticket from the data owner naming the dataset, the purpose, the duration and the masking level.",
        "escalation": "Unexpected reads go to the security on-call and the data protection officer.",
    },
]

# Decision transitions inside a thread: what tends to happen next in a real ticket
# (evidence requested -> evidence arrives -> approve; alert -> escalate -> revoke ...).
# Escalate appears in every topic while deny/revoke do not, so transitions lean away
# from escalate to keep the five decisions roughly balanced overall.
TRANSITIONS = {
    "request_evidence": ["approve", "approve", "request_evidence", "deny"],
    "escalate": ["revoke", "revoke", "deny", "request_evidence"],
    "deny": ["request_evidence", "approve", "revoke", "deny"],
    "approve": ["revoke", "request_evidence", "deny"],
    "revoke": ["approve", "request_evidence", "escalate", "deny"],
}

# Runbook steps per decision (shared across topics: the decision semantics are global).
DECISION_STEPS = {
    "approve": [
        "Open the attached ticket and check that it is approved by someone other than the requester.",
        "Apply the change with the narrowest scope and the shortest duration that works.",
        "Record the ticket number in the access log so the next review can find it.",
    ],
    "request_evidence": [
        "Do not make any change yet.",
        "Ask the requester for the missing ticket, approval or record, and say which policy needs it.",
        "Keep the request open for five working days, then close it if nothing arrives.",
    ],
    "deny": [
        "Do not make the change, even partially.",
        "Explain which rule of the policy forbids the request.",
        "Offer the compliant alternative, for example a named account, an expiring credential or a time-limited grant.",
    ],
    "revoke": [
        "Disable the access or credential immediately.",
        "Rotate any secret that could have been copied while it was active.",
        "Notify the owner or manager and record the revocation in the ticket.",
    ],
    "escalate": [
        "Do not contact the user first if a compromise is possible.",
        "Page the security on-call with the evidence: logs, source addresses and timestamps.",
        "Preserve the logs and keep the account under watch until security responds.",
    ],
}

LESSONS = [
    "Alerts that mention an unfamiliar location should be routed to security before anyone contacts the user.",
    "Requests that arrive through chat need a ticket before anybody acts on them.",
    "Naming the policy id in every reply made the audit trail much easier to follow.",
    "Time-boxed grants removed the need for a separate clean-up task.",
    "The requester assumed an informal approval was enough; the policy text was linked in the reply.",
    "Automated scans caught the issue before any damage was done.",
    "The owner was unreachable for days, which is why ownerless credentials are revoked by default.",
    "Keeping the decision vocabulary small (approve, deny, revoke, escalate, request evidence) kept responders consistent.",
    "The attached ticket made the approval trivial to verify.",
    "The team now adds the ticket number to the first message of every access request.",
]


# --------------------------------------------------------------------------------------
# Entity sampling and text assembly
# --------------------------------------------------------------------------------------

def _key_id(rng: random.Random) -> str:
    # Realistic-looking key ids in a few formats (AWS-style, hex, token-style).
    style = rng.randrange(3)
    if style == 0:
        return "AKIA" + "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(12))
    if style == 1:
        return "key_" + "".join(rng.choice("0123456789abcdef") for _ in range(8))
    return "pat-" + "".join(rng.choice("0123456789abcdef") for _ in range(6))


def _date(rng: random.Random) -> str:
    return f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.choice([2024, 2025])}"


def sample_entities(rng: random.Random, tenant: str) -> dict:
    """One consistent set of names/systems/ids per thread (follow-ups reuse them)."""
    name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    manager = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    while manager == name:
        manager = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    return {
        "tenant": tenant,
        "name": name,
        "manager": manager,
        "system": rng.choice(SYSTEMS),
        "key": _key_id(rng),
        "ticket": f"{rng.choice(TICKET_PREFIXES)}-{rng.randint(1000, 99999)}",
        "inc": f"INC-{rng.randint(1000, 99999)}",
        "case": f"CS-{rng.randint(10000, 99999)}",
        "days": rng.randint(95, 420),
        "overdue": rng.choice([15, 21, 30, 45, 60]),
        "short_days": rng.choice([7, 14, 30, 60]),
        "hours": rng.choice([2, 4, 8, 12]),
        "loc": rng.choice(LOCATIONS),
        "vendor": rng.choice(VENDORS),
        "svc": rng.choice(SERVICE_ACCOUNTS),
        "role": rng.choice(ROLES),
        "shared": rng.choice(SHARED_ACCOUNTS),
        "team": rng.choice(TEAMS),
        "dataset": rng.choice(DATASETS),
        "date": _date(rng),
    }


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def make_prompt(rng: random.Random, topic: dict, decision: str, ent: dict, turn: int) -> str:
    """User message: [opener] situation-or-reference + decision cue [closer]."""
    cue = rng.choice(topic["cues"][decision]).format(**ent)
    closer = rng.choice(CLOSERS)
    if turn == 1:
        opener = rng.choice(OPENERS).format(**ent)
        subject = rng.choice(topic["subjects"]).format(**ent)
        return _join(opener, subject, cue, closer)
    # Follow-ups restate the topic through a short reference so each row stays
    # self-contained (rows are trained as single prompt/completion pairs).
    ref = rng.choice(topic["refs"]).format(**ent)
    return _join(rng.choice(FOLLOWUP_OPENERS).format(ref=ref), cue, closer)


def make_completion(rng: random.Random, topic: dict, decision: str, ent: dict) -> str:
    reply = rng.choice(topic["replies"][decision]).format(pid=topic["policy"], **ent)
    # json.dumps with default separators gives exactly
    # {"decision": "...", "policy": "...", "reply": "..."} (key order preserved).
    return json.dumps({"decision": decision, "policy": topic["policy"], "reply": reply},
                      ensure_ascii=False)


def decision_sequence(rng: random.Random, topic: dict, n_turns: int) -> list[str]:
    allowed = [d for d in DECISIONS if d in topic["cues"]]
    seq = [rng.choice(allowed)]
    while len(seq) < n_turns:
        nxt = [d for d in TRANSITIONS[seq[-1]] if d in topic["cues"]]
        # Half the time follow a plausible ticket story, half the time pick uniformly:
        # pure transitions skew the decision mix, pure uniform reads like noise.
        seq.append(rng.choice(nxt) if nxt and rng.random() < 0.5 else rng.choice(allowed))
    return seq


def make_thread(rng: random.Random, thread_id: str, n_turns: int) -> dict:
    tenant = rng.choice(TENANTS)
    topic = rng.choice(TOPICS)
    ent = sample_entities(rng, tenant)
    turns = []
    for i, decision in enumerate(decision_sequence(rng, topic, n_turns), start=1):
        turns.append({
            "turn": i,
            "decision": decision,
            "prompt": make_prompt(rng, topic, decision, ent, i),
            "completion": make_completion(rng, topic, decision, ent),
        })
    return {"thread_id": thread_id, "tenant": tenant, "topic": topic, "ent": ent, "turns": turns}


# --------------------------------------------------------------------------------------
# sft_rows.jsonl
# --------------------------------------------------------------------------------------

# Counts of deliberately bad rows (~1% of the file).  Not marked in the data: the
# validation/cleaning stage of the pipeline is supposed to find them.
BAD_EMPTY_COMPLETION = 12
BAD_MISSING_THREAD_ID = 8
BAD_DUPLICATES = 10
BAD_WHITESPACE_COMPLETION = 1


def build_rows(rng: random.Random, n_good: int) -> tuple[list[dict], dict]:
    rows: list[dict] = []
    n_inplace = BAD_EMPTY_COMPLETION + BAD_MISSING_THREAD_ID + BAD_WHITESPACE_COMPLETION
    tid = 1001
    # Generate whole threads until we have enough rows; rows corrupted in place below
    # are generated on top so that ~n_good rows survive cleaning.
    while len(rows) < n_good + n_inplace:
        th = make_thread(rng, f"T{tid}", rng.choice([1, 2, 2, 3, 3, 3, 4, 4, 5]))
        tid += 1
        for t in th["turns"]:
            rows.append({
                "thread_id": th["thread_id"],
                "tenant": th["tenant"],
                "topic": th["topic"]["key"],
                "turn": t["turn"],
                "policy_id": th["topic"]["policy"],
                "expected_decision": t["decision"],
                "prompt": t["prompt"],
                "completion": t["completion"],
            })

    # Corrupt disjoint, deterministic positions in place.
    picks = rng.sample(range(len(rows)), n_inplace)
    empty = picks[:BAD_EMPTY_COMPLETION]
    missing = picks[BAD_EMPTY_COMPLETION:BAD_EMPTY_COMPLETION + BAD_MISSING_THREAD_ID]
    blank = picks[BAD_EMPTY_COMPLETION + BAD_MISSING_THREAD_ID:]
    for i in empty:
        rows[i]["completion"] = ""
    for i in missing:
        del rows[i]["thread_id"]
    for i in blank:
        rows[i]["completion"] = "  \n "

    # Exact duplicates: copy a clean earlier row and re-insert it somewhere later, like a
    # double-submitted export page would.
    corrupted = set(picks)
    candidates = [i for i in range(int(len(rows) * 0.8)) if i not in corrupted]
    sources = sorted(rng.sample(candidates, BAD_DUPLICATES))
    inserts: dict[int, list[dict]] = {}
    for src in sources:
        pos = rng.randint(src + 1, len(rows))  # insert before index `pos` (len = append)
        inserts.setdefault(pos, []).append(dict(rows[src]))
    out: list[dict] = []
    for i in range(len(rows) + 1):
        out.extend(inserts.get(i, []))
        if i < len(rows):
            out.append(rows[i])

    stats = {
        "empty_completion": BAD_EMPTY_COMPLETION,
        "missing_thread_id": BAD_MISSING_THREAD_ID,
        "exact_duplicate": BAD_DUPLICATES,
        "whitespace_completion": BAD_WHITESPACE_COMPLETION,
        "threads": tid - 1001,
    }
    return out, stats


# --------------------------------------------------------------------------------------
# sft_threads.jsonl
# --------------------------------------------------------------------------------------

def build_threads(rng: random.Random, n_threads: int, first_id: int) -> list[dict]:
    # Separate id range from sft_rows.jsonl so the two files never share a group key
    # (a grouped train/eval split across both files stays leak-free).
    out = []
    for k in range(n_threads):
        th = make_thread(rng, f"T{first_id + k}", rng.choice([2, 3]))
        messages = []
        for t in th["turns"]:
            messages.append({"role": "user", "content": t["prompt"]})
            messages.append({"role": "assistant", "content": t["completion"]})
        out.append({
            "thread_id": th["thread_id"],
            "tenant": th["tenant"],
            "topic": th["topic"]["key"],
            "policy_id": th["topic"]["policy"],
            "expected_decision": th["turns"][-1]["decision"],
            "messages": messages,
        })
    return out


# --------------------------------------------------------------------------------------
# corpus.jsonl
# --------------------------------------------------------------------------------------

def _allowed(topic: dict) -> list[str]:
    return [d for d in DECISIONS if d in topic["cues"]]


def _decision_words(d: str) -> str:
    return d.replace("_", " ")


def policy_doc(rng: random.Random, topic: dict) -> dict:
    pid = topic["policy"]
    lines = [f"{pid} {topic['title']}", "",
             f"Purpose. {topic['purpose']}", "",
             f"Scope. {topic['scope']}", "", "Rules."]
    lines += [f"{i}. {r}" for i, r in enumerate(topic["rules"], start=1)]
    lines += ["", f"Evidence required. {topic['evidence']}", "",
              f"Decisions. Requests about {topic['noun']} are answered under {pid} with one "
              f"of the standard decisions: {', '.join(_allowed(topic))}."]
    for d in _allowed(topic):
        lines.append(f"- {d}: when {topic['when'][d]}.")
    lines += ["", f"Escalation path. {topic['escalation']}", "",
              "Examples."]
    # Worked examples make the policy text itself carry the prompt->decision mapping.
    for d in _allowed(topic):
        ent = sample_entities(rng, rng.choice(TENANTS))
        lines.append(f"Request: {make_prompt(rng, topic, d, ent, 1)}")
        lines.append(f"Answer: {make_completion(rng, topic, d, ent)}")
    lines += ["", f"Ownership. {pid} is owned by the Identity and Access Management team and "
              "reviewed every twelve months. Exceptions are recorded in the change system, "
              "name an accountable owner and expire automatically. Questions go to the "
              "#access-policy channel."]
    return {"doc_id": pid, "text": "\n".join(lines)}


def runbook_doc(rng: random.Random, topic: dict, decision: str) -> dict:
    pid = topic["policy"]
    ent = sample_entities(rng, rng.choice(TENANTS))
    ex_cues = [c.format(**ent) for c in topic["cues"][decision]]
    lines = [f"Runbook RB-{pid}-{decision}: {topic['title']} ({pid}), decision "
             f"{_decision_words(decision)}", "",
             f"When to use. Use this runbook when {topic['when'][decision]}.", "",
             "Signals. Typical messages say things like: "
             + " / ".join(f'"{c}"' for c in ex_cues), "", "Steps.",
             f"1. Confirm the request concerns {topic['noun']} and identify the owner, "
             "the system and any ticket number."]
    for i, step in enumerate(DECISION_STEPS[decision], start=2):
        lines.append(f"{i}. {step}")
    lines.append(f"{len(DECISION_STEPS[decision]) + 2}. Reply with the decision "
                 f"{decision} and cite {pid}.")
    lines += ["", "Reply format. The access-policy assistant answers with one JSON object "
              "on a single line with the keys decision, policy and reply, for example:",
              make_completion(rng, topic, decision, ent), "",
              f"Related decisions under {pid}: "
              + "; ".join(f"{d} when {topic['when'][d]}" for d in _allowed(topic) if d != decision)
              + "."]
    return {"doc_id": f"RB-{pid}-{decision}", "text": "\n".join(lines)}


def faq_doc(rng: random.Random, topic: dict) -> dict:
    pid = topic["policy"]
    lines = [f"FAQ: {topic['title']} ({pid})", ""]
    for d in _allowed(topic):
        ent = sample_entities(rng, rng.choice(TENANTS))
        lines.append(f"Q: What happens when {topic['when'][d]}?")
        lines.append(f"A: The decision is {d}. "
                     + rng.choice(topic["replies"][d]).format(pid=pid, **ent))
        lines.append("")
    lines.append(f"Q: Which policy covers {topic['noun']}?")
    lines.append(f"A: {pid} {topic['title']}. {topic['purpose']}")
    return {"doc_id": f"FAQ-{pid}", "text": "\n".join(lines)}


def incident_doc(rng: random.Random, n: int) -> dict:
    topic = rng.choice(TOPICS)
    pid = topic["policy"]
    tenant = rng.choice(TENANTS)
    ent = sample_entities(rng, tenant)
    seq = decision_sequence(rng, topic, rng.choice([1, 2]))
    final = seq[-1]
    hh = rng.randint(0, 20)
    times = [f"{hh:02d}:{rng.randint(0, 59):02d}", f"{hh + 1:02d}:{rng.randint(0, 59):02d}",
             f"{hh + 3:02d}:{rng.randint(0, 59):02d}"]
    responder = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    summary = _join(rng.choice(topic["subjects"]).format(**ent),
                    rng.choice(topic["cues"][final]).format(**ent))
    lines = [f"Incident write-up IR-{n:04d} ({tenant}, {ent['date']})",
             f"Topic: {topic['title']}. Policy: {pid}. Final decision: {final}.", "",
             f"Summary. {summary}", ""]
    if len(seq) == 2:
        first_cue = rng.choice(topic["cues"][seq[0]]).format(**ent)
        lines += [f"Prior contact. Earlier the same thread was answered with "
                  f"{seq[0]} because: {first_cue}", ""]
    lines += [f"Timeline. At {times[0]} the request reached the access desk. At {times[1]} "
              f"{responder} reviewed it against {pid}. At {times[2]} the decision "
              f"{final} was recorded in the ticket.", "",
              "Decision and rationale. "
              + rng.choice(topic["replies"][final]).format(pid=pid, **ent), "",
              f"Follow-up. {rng.choice(DECISION_STEPS[final])} "
              f"{rng.choice(DECISION_STEPS[final])}", "",
              f"Lessons learned. {rng.choice(LESSONS)}"]
    return {"doc_id": f"IR-{n:04d}", "text": "\n".join(lines)}


def guide_docs() -> list[dict]:
    """Two cross-cutting documents: the decision vocabulary and the reply format."""
    dec = ["Access decision guide", "",
           "Every access incident is answered with exactly one of five decisions.",
           "- approve: the request is allowed and the required evidence, usually an approved "
           "ticket, is attached.",
           "- request_evidence: the request might be allowed but the ticket, approval or "
           "record is missing.",
           "- deny: the request asks for something the policy forbids outright, such as a "
           "non-expiring key, a shared password or self-approval.",
           "- revoke: access or a credential must be removed because it is unused, exposed, "
           "or its owner, contract or incident has ended.",
           "- escalate: something suspicious or unexplained happened and security (or a "
           "director, for overdue reviews) must look first.", "",
           "Policies by topic:"]
    dec += [f"- {t['noun']}: {t['policy']} {t['title']}" for t in TOPICS]
    fmt = ["Reply format for the access-policy assistant", "",
           "The assistant answers every message with a single-line JSON object with the keys "
           "decision, policy and reply in that order. decision is one of request_evidence, "
           "escalate, deny, approve, revoke. policy is the policy id, for example AC-104. "
           "reply is one short sentence for the requester that names the action and cites "
           "the policy.", "",
           'Example: {"decision": "request_evidence", "policy": "AC-107", "reply": "Please '
           'attach a ticket and the signed contract first, because AC-107 requires both '
           'before any vendor account is created."}']
    return [{"doc_id": "GUIDE-decisions", "text": "\n".join(dec)},
            {"doc_id": "GUIDE-reply-format", "text": "\n".join(fmt)}]


def build_corpus(rng: random.Random, n_incidents: int) -> list[dict]:
    docs = guide_docs()
    docs += [policy_doc(rng, t) for t in TOPICS]
    docs += [runbook_doc(rng, t, d) for t in TOPICS for d in _allowed(t)]
    docs += [faq_doc(rng, t) for t in TOPICS]
    docs += [incident_doc(rng, n) for n in range(1, n_incidents + 1)]
    return docs


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------

def _atomic_write(path: Path, text: str) -> None:
    # Readers (or a crashed run) never see a half-written file: write aside, then rename.
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


README = """# access_policy demo data

Synthetic, deterministic data for the sftc worked example (the access-policy assistant).
Regenerate with `python demo/generate_data.py --out data/access_policy --seed {seed}`;
the same seed always gives byte-identical files.

- `sft_rows.jsonl`: one prompt/completion row per user message. Fields: `thread_id`
  (group key, several rows per thread), `tenant`, `topic`, `turn` (1..n in the thread),
  `policy_id` (AC-1xx, one per topic), `expected_decision` (request_evidence, escalate,
  deny, approve, revoke), `prompt` (the user's incident message), `completion` (a
  one-line JSON string `{{"decision": ..., "policy": ..., "reply": ...}}`). About 1% of
  the rows are realistically broken (empty or whitespace completion, missing
  `thread_id`, exact duplicates) and are not marked.
- `sft_threads.jsonl`: multi-turn conversations. Fields: `thread_id`, `tenant`, `topic`,
  `policy_id`, `expected_decision` (both refer to the final assistant turn), `messages`
  (alternating user/assistant; assistant contents are the JSON replies). Thread ids do
  not overlap with `sft_rows.jsonl`.
- `corpus.jsonl`: domain text for continued pretraining, `{{"doc_id", "text"}}`: one
  policy document per policy id (doc_id = policy id), runbooks (`RB-...`), FAQs
  (`FAQ-...`), incident write-ups (`IR-....`) and two guides (`GUIDE-...`).
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data/access_policy", type=Path)
    ap.add_argument("--seed", default=7, type=int)
    ap.add_argument("--rows", default=3000, type=int, help="target number of good rows")
    ap.add_argument("--threads", default=800, type=int, help="conversations in sft_threads")
    ap.add_argument("--incidents", default=380, type=int, help="incident write-ups in corpus")
    args = ap.parse_args(argv)

    # Independent streams per file: changing --threads does not reshuffle sft_rows.
    rows, stats = build_rows(random.Random(f"{args.seed}:rows"), args.rows)
    threads = build_threads(random.Random(f"{args.seed}:threads"), args.threads, first_id=50001)
    corpus = build_corpus(random.Random(f"{args.seed}:corpus"), args.incidents)

    args.out.mkdir(parents=True, exist_ok=True)
    _atomic_write(args.out / "sft_rows.jsonl", _jsonl(rows))
    _atomic_write(args.out / "sft_threads.jsonl", _jsonl(threads))
    _atomic_write(args.out / "corpus.jsonl", _jsonl(corpus))
    _atomic_write(args.out / "README.md", README.format(seed=args.seed))

    n_bad = sum(v for k, v in stats.items() if k != "threads")
    chars = sum(len(d["text"]) for d in corpus)
    print(f"sft_rows.jsonl: {len(rows)} rows ({len(rows) - n_bad} good, {n_bad} bad: "
          f"{ {k: v for k, v in stats.items() if k != 'threads'} }) in {stats['threads']} threads")
    print(f"sft_threads.jsonl: {len(threads)} threads")
    print(f"corpus.jsonl: {len(corpus)} docs, {chars} chars")
    return 0


if __name__ == "__main__":
    sys.exit(main())
