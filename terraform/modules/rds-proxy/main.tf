# RDS Proxy for PostgreSQL in front of asyncpool on Lambda.
#
# Clients log in with IAM tokens over TLS (no password in the function); the proxy logs in to
# PostgreSQL with a password it reads from Secrets Manager and multiplexes many client connections
# over about target_backend_connections server connections, one transaction at a time.
#
# No session_pinning_filters: the only filter, EXCLUDE_VARIABLE_SETS, exists for MySQL alone. With
# PostgreSQL, keep sessions unpinned on the client side instead: asyncpool sends no SET, no
# SQL-level PREPARE, no temp tables and no startup `options` (RDS Proxy rejects them).

data "aws_region" "current" {}
data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

locals {
  # RDS Proxy sizes its pool as a percentage of the database's max_connections.
  max_connections_percent      = ceil(100 * var.target_backend_connections / var.db_max_connections)
  max_idle_connections_percent = floor(local.max_connections_percent * var.max_idle_connections_share)
  # arn:aws:rds:<region>:<account>:db-proxy:prx-0123456789abcdef -> prx-0123456789abcdef
  proxy_resource_id = element(split(":", aws_db_proxy.this.arn), 6)
  region            = data.aws_region.current.region
}

# -- the proxy's own database credentials -------------------------------------------------------

ephemeral "random_password" "db" {
  length = 40
  # Characters that need no quoting in a PostgreSQL literal, a URL or a shell.
  override_special = "-_.~"
}

resource "aws_secretsmanager_secret" "db" {
  name_prefix             = "${var.name}-db-"
  description             = "Password RDS Proxy ${var.name} uses to log in to PostgreSQL as ${var.db_username}."
  kms_key_id              = var.kms_key_arn
  recovery_window_in_days = 7
  tags                    = var.tags
}

resource "aws_secretsmanager_secret_version" "db" {
  secret_id = aws_secretsmanager_secret.db.id
  # Write-only: the generated password reaches Secrets Manager but never the Terraform state.
  secret_string_wo = jsonencode({
    username = var.db_username
    password = ephemeral.random_password.db.result
  })
  secret_string_wo_version = var.db_password_version
}

resource "aws_secretsmanager_secret_rotation" "db" {
  secret_id           = aws_secretsmanager_secret.db.id
  rotation_lambda_arn = var.rotation_lambda_arn

  rotation_rules {
    automatically_after_days = var.rotation_days
  }

  depends_on = [aws_secretsmanager_secret_version.db]
}

# -- the role the proxy assumes to read that secret ---------------------------------------------

data "aws_iam_policy_document" "proxy_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["rds.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [data.aws_caller_identity.current.account_id]
    }
  }
}

resource "aws_iam_role" "proxy" {
  name_prefix        = "${var.name}-proxy-"
  description        = "RDS Proxy ${var.name}: reads the database credentials secret."
  assume_role_policy = data.aws_iam_policy_document.proxy_assume.json
  tags               = var.tags
}

data "aws_iam_policy_document" "proxy_secrets" {
  statement {
    sid       = "ReadDatabaseCredentials"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [aws_secretsmanager_secret.db.arn]
  }

  statement {
    sid       = "DecryptDatabaseCredentials"
    actions   = ["kms:Decrypt"]
    resources = [var.kms_key_arn]
    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["secretsmanager.${local.region}.amazonaws.com"]
    }
  }
}

resource "aws_iam_role_policy" "proxy_secrets" {
  name   = "read-database-credentials"
  role   = aws_iam_role.proxy.id
  policy = data.aws_iam_policy_document.proxy_secrets.json
}

# -- network: clients -> proxy -> database, on the PostgreSQL port only ------------------------

resource "aws_security_group" "proxy" {
  #checkov:skip=CKV2_AWS_5:attached to aws_db_proxy.this through vpc_security_group_ids; the check does not follow RDS Proxy attachments
  name_prefix = "${var.name}-proxy-"
  description = "RDS Proxy ${var.name}: PostgreSQL from its clients, to its database."
  vpc_id      = var.vpc_id
  tags        = var.tags

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "proxy_from_clients" {
  for_each = toset(var.client_security_group_ids)

  security_group_id            = aws_security_group.proxy.id
  description                  = "PostgreSQL from asyncpool clients"
  ip_protocol                  = "tcp"
  from_port                    = var.db_port
  to_port                      = var.db_port
  referenced_security_group_id = each.value
  tags                         = var.tags
}

resource "aws_vpc_security_group_egress_rule" "proxy_to_db" {
  security_group_id            = aws_security_group.proxy.id
  description                  = "PostgreSQL to the database"
  ip_protocol                  = "tcp"
  from_port                    = var.db_port
  to_port                      = var.db_port
  referenced_security_group_id = var.db_security_group_id
  tags                         = var.tags
}

resource "aws_vpc_security_group_ingress_rule" "db_from_proxy" {
  security_group_id            = var.db_security_group_id
  description                  = "PostgreSQL from RDS Proxy ${var.name}"
  ip_protocol                  = "tcp"
  from_port                    = var.db_port
  to_port                      = var.db_port
  referenced_security_group_id = aws_security_group.proxy.id
  tags                         = var.tags
}

# -- the proxy -----------------------------------------------------------------------------------

resource "aws_db_proxy" "this" {
  name                   = var.name
  engine_family          = "POSTGRESQL"
  role_arn               = aws_iam_role.proxy.arn
  vpc_subnet_ids         = var.subnet_ids
  vpc_security_group_ids = [aws_security_group.proxy.id]
  require_tls            = true
  idle_client_timeout    = var.idle_client_timeout
  # Debug logging writes SQL text (and its literals) to CloudWatch: off.
  debug_logging = false

  auth {
    auth_scheme               = "SECRETS"
    description               = "${var.db_username}: IAM token from the client, SCRAM-SHA-256 to PostgreSQL"
    iam_auth                  = "REQUIRED"
    client_password_auth_type = "POSTGRES_SCRAM_SHA_256" # pragma: allowlist secret (an auth method)
    secret_arn                = aws_secretsmanager_secret.db.arn
  }

  tags = var.tags

  depends_on = [aws_iam_role_policy.proxy_secrets]
}

resource "aws_db_proxy_default_target_group" "this" {
  db_proxy_name = aws_db_proxy.this.name

  connection_pool_config {
    max_connections_percent      = local.max_connections_percent
    max_idle_connections_percent = local.max_idle_connections_percent
    connection_borrow_timeout    = var.connection_borrow_timeout
  }

  lifecycle {
    precondition {
      condition     = local.max_connections_percent >= 1 && local.max_connections_percent <= 100
      error_message = "target_backend_connections (${var.target_backend_connections}) must not exceed db_max_connections (${var.db_max_connections})."
    }
  }
}

resource "aws_db_proxy_target" "this" {
  db_proxy_name          = aws_db_proxy.this.name
  target_group_name      = aws_db_proxy_default_target_group.this.name
  db_instance_identifier = var.db_instance_identifier
  db_cluster_identifier  = var.db_cluster_identifier

  lifecycle {
    precondition {
      condition     = (var.db_instance_identifier == null) != (var.db_cluster_identifier == null)
      error_message = "Set exactly one of db_instance_identifier and db_cluster_identifier."
    }
  }
}

# -- what a client needs: rds-db:connect as db_username on this proxy only ----------------------

data "aws_iam_policy_document" "connect" {
  statement {
    sid     = "ConnectThroughProxy"
    actions = ["rds-db:connect"]
    resources = [
      "arn:${data.aws_partition.current.partition}:rds-db:${local.region}:${data.aws_caller_identity.current.account_id}:dbuser:${local.proxy_resource_id}/${var.db_username}",
    ]
  }
}

resource "aws_iam_policy" "connect" {
  name_prefix = "${var.name}-connect-"
  description = "Log in to RDS Proxy ${var.name} as ${var.db_username} with an IAM token."
  policy      = data.aws_iam_policy_document.connect.json
  tags        = var.tags
}
