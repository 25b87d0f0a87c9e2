# Example root module: a Python Lambda function using asyncpool against an existing RDS for
# PostgreSQL instance, through RDS Proxy (default) or a self-hosted PgBouncer (pooler = "pgbouncer").
#
# Sizing: every execution environment handles one request at a time and keeps one pooled
# connection (ASYNCPOOL_MAX_SIZE=1), so reserved_concurrency (500) is the number of client
# connections the pooler sees; the pooler multiplexes them over ~50 PostgreSQL connections.

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

data "aws_db_instance" "this" {
  db_instance_identifier = var.db_instance_identifier
}

locals {
  use_proxy    = var.pooler == "rds-proxy"
  aws_policies = "arn:${data.aws_partition.current.partition}:iam::aws:policy"

  # The outputs of whichever pooler module exists (exactly one has an instance).
  pooler = concat(
    [for m in module.rds_proxy : {
      endpoint          = m.endpoint
      port              = m.port
      user              = m.user
      region            = m.region
      security_group_id = m.security_group_id
      settings          = m.asyncpool_settings
    }],
    [for m in module.pgbouncer : {
      endpoint          = m.endpoint
      port              = m.port
      user              = m.user
      region            = m.region
      security_group_id = m.security_group_id
      settings          = m.asyncpool_settings
    }],
  )[0]

  function_environment = merge(
    {
      # No password in the DSN: IamAuth (rds-proxy) or SecretsManagerAuth (pgbouncer) supplies it.
      ASYNCPOOL_DSN                 = "postgresql://${local.pooler.user}@${local.pooler.endpoint}:${local.pooler.port}/${var.db_name}"
      ASYNCPOOL_NAME                = var.name
      ASYNCPOOL_SSL                 = local.pooler.settings["ASYNCPOOL_SSL"]
      ASYNCPOOL_PREPARED_STATEMENTS = coalesce(var.prepared_statements, local.pooler.settings["ASYNCPOOL_PREPARED_STATEMENTS"])
      ASYNCPOOL_MIN_SIZE            = "1"
      ASYNCPOOL_MAX_SIZE            = "1"
      # Read by the handler to pick the credentials provider.
      DB_AUTH = local.use_proxy ? "iam" : "secrets-manager"
    },
    local.use_proxy ? {} : {
      ASYNCPOOL_SSL_ROOT_CERT = "/var/task/${var.pgbouncer_ca_path}"
      DB_SECRET_ARN           = var.app_credentials_secret_arn
    },
  )
}

# -- one customer-managed key for the secrets, logs and queue of the example --------------------

data "aws_iam_policy_document" "kms" {
  # A key policy, not an identity policy: its Resource "*" can only mean this key, and AWS requires
  # the account root to hold kms:* on it (the default key policy), or the key becomes unmanageable.
  #checkov:skip=CKV_AWS_109:key policy; Resource "*" is this key and the principal is this account's root (AWS default key policy)
  #checkov:skip=CKV_AWS_111:key policy; Resource "*" is this key and the principal is this account's root (AWS default key policy)
  #checkov:skip=CKV_AWS_356:key policy; Resource "*" is this key and the principal is this account's root (AWS default key policy)
  statement {
    sid       = "AccountAdministration"
    actions   = ["kms:*"]
    resources = ["*"] # in a key policy, "*" is this key
    principals {
      type        = "AWS"
      identifiers = ["arn:${data.aws_partition.current.partition}:iam::${data.aws_caller_identity.current.account_id}:root"]
    }
  }

  statement {
    sid       = "CloudWatchLogs"
    actions   = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
    resources = ["*"]
    principals {
      type        = "Service"
      identifiers = ["logs.${var.region}.amazonaws.com"]
    }
    condition {
      test     = "ArnLike"
      variable = "kms:EncryptionContext:aws:logs:arn"
      values   = ["arn:${data.aws_partition.current.partition}:logs:${var.region}:${data.aws_caller_identity.current.account_id}:log-group:*"]
    }
  }
}

resource "aws_kms_key" "this" {
  description             = "${var.name}: database secrets, logs and dead-letter queue"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms.json
}

# -- the pooler ----------------------------------------------------------------------------------

module "rds_proxy" {
  source = "../../modules/rds-proxy"
  count  = local.use_proxy ? 1 : 0

  name                      = var.name
  vpc_id                    = var.vpc_id
  subnet_ids                = var.subnet_ids
  db_instance_identifier    = var.db_instance_identifier
  db_security_group_id      = var.db_security_group_id
  db_port                   = data.aws_db_instance.this.port
  db_username               = var.db_username
  db_max_connections        = var.db_max_connections
  kms_key_arn               = aws_kms_key.this.arn
  rotation_lambda_arn       = var.rotation_lambda_arn
  client_security_group_ids = [aws_security_group.function.id]
  tags                      = var.tags
}

module "pgbouncer" {
  source = "../../modules/pgbouncer-fargate"
  count  = local.use_proxy ? 0 : 1

  name                      = var.name
  vpc_id                    = var.vpc_id
  subnet_ids                = var.subnet_ids
  db_host                   = data.aws_db_instance.this.address
  db_port                   = data.aws_db_instance.this.port
  db_security_group_id      = var.db_security_group_id
  db_username               = var.db_username
  db_credentials_secret_arn = var.app_credentials_secret_arn
  tls_secret_arn            = var.pgbouncer_tls_secret_arn
  image                     = var.pgbouncer_image
  server_tls_ca_pem         = var.db_ca_pem
  kms_key_arn               = aws_kms_key.this.arn
  client_security_group_ids = [aws_security_group.function.id]
  tags                      = var.tags
}

# -- the function's network: out to the pooler only ---------------------------------------------

resource "aws_security_group" "function" {
  name_prefix = "${var.name}-fn-"
  description = "${var.name} Lambda function: PostgreSQL to the pooler only"
  vpc_id      = var.vpc_id

  lifecycle {
    create_before_destroy = true
  }
}

# IAM tokens are signed locally (no AWS API call), so the function needs no other egress.
resource "aws_vpc_security_group_egress_rule" "function_to_pooler" {
  security_group_id            = aws_security_group.function.id
  description                  = "PostgreSQL protocol to the ${var.pooler}"
  ip_protocol                  = "tcp"
  from_port                    = local.pooler.port
  to_port                      = local.pooler.port
  referenced_security_group_id = local.pooler.security_group_id
}

# SecretsManagerAuth (pgbouncer) fetches the password over HTTPS: through a Secrets Manager VPC
# endpoint or NAT.
resource "aws_vpc_security_group_egress_rule" "function_to_secrets_manager" {
  count = local.use_proxy ? 0 : 1

  security_group_id = aws_security_group.function.id
  description       = "HTTPS to Secrets Manager (VPC endpoint or NAT)"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = "0.0.0.0/0"
}

# -- the function's role -------------------------------------------------------------------------

data "aws_iam_policy_document" "function_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["lambda.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "function" {
  name_prefix        = "${var.name}-fn-"
  description        = "${var.name} Lambda function"
  assume_role_policy = data.aws_iam_policy_document.function_assume.json
}

# Network interfaces in the VPC and CloudWatch Logs.
resource "aws_iam_role_policy_attachment" "function_vpc" {
  role       = aws_iam_role.function.name
  policy_arn = "${local.aws_policies}/service-role/AWSLambdaVPCAccessExecutionRole"
}

resource "aws_iam_role_policy_attachment" "function_xray" {
  role       = aws_iam_role.function.name
  policy_arn = "${local.aws_policies}/AWSXRayDaemonWriteAccess"
}

# rds-proxy: rds-db:connect as db_username on this proxy, nothing else.
resource "aws_iam_role_policy_attachment" "function_connect" {
  count = local.use_proxy ? 1 : 0

  role       = aws_iam_role.function.name
  policy_arn = module.rds_proxy[0].connect_policy_arn
}

data "aws_iam_policy_document" "function" {
  statement {
    sid       = "DeadLetterQueue"
    actions   = ["sqs:SendMessage"]
    resources = [aws_sqs_queue.dlq.arn]
  }

  # The example's key, used through the services that hold data under it: the dead-letter queue,
  # the function's environment variables and (pgbouncer) the password secret.
  statement {
    sid       = "UseKeyThroughServices"
    actions   = ["kms:GenerateDataKey", "kms:Decrypt"]
    resources = [aws_kms_key.this.arn]
    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values = [
        "sqs.${var.region}.amazonaws.com",
        "lambda.${var.region}.amazonaws.com",
        "secretsmanager.${var.region}.amazonaws.com",
      ]
    }
  }

  # pgbouncer: read the application's password.
  dynamic "statement" {
    for_each = local.use_proxy ? [] : [var.app_credentials_secret_arn]
    content {
      sid       = "ReadDatabasePassword"
      actions   = ["secretsmanager:GetSecretValue"]
      resources = [statement.value]
    }
  }
}

resource "aws_iam_role_policy" "function" {
  name   = "dead-letter-queue-and-secrets"
  role   = aws_iam_role.function.id
  policy = data.aws_iam_policy_document.function.json
}

# -- the function ----------------------------------------------------------------------------------

resource "aws_sqs_queue" "dlq" {
  name_prefix               = "${var.name}-dlq-"
  kms_master_key_id         = aws_kms_key.this.arn
  message_retention_seconds = 1209600
}

resource "aws_cloudwatch_log_group" "function" {
  name              = "/aws/lambda/${var.name}"
  retention_in_days = 365
  kms_key_id        = aws_kms_key.this.arn
}

resource "aws_lambda_function" "this" {
  #checkov:skip=CKV_AWS_272:the example deploys a locally built zip; sign artifacts and set code_signing_config_arn in the pipeline that builds them
  function_name                  = var.name
  description                    = "asyncpool through ${var.pooler}"
  role                           = aws_iam_role.function.arn
  filename                       = var.lambda_package
  source_code_hash               = filebase64sha256(var.lambda_package)
  handler                        = var.lambda_handler
  runtime                        = var.lambda_runtime
  architectures                  = [var.lambda_architecture]
  memory_size                    = 512
  timeout                        = var.lambda_timeout
  reserved_concurrent_executions = var.reserved_concurrency
  kms_key_arn                    = aws_kms_key.this.arn

  vpc_config {
    subnet_ids         = var.subnet_ids
    security_group_ids = [aws_security_group.function.id]
  }

  environment {
    variables = local.function_environment
  }

  tracing_config {
    mode = "Active"
  }

  dead_letter_config {
    target_arn = aws_sqs_queue.dlq.arn
  }

  logging_config {
    log_format = "JSON"
    log_group  = aws_cloudwatch_log_group.function.name
  }

  depends_on = [
    aws_iam_role_policy_attachment.function_vpc,
    aws_iam_role_policy.function,
    aws_cloudwatch_log_group.function,
  ]

  lifecycle {
    precondition {
      condition     = !local.use_proxy || var.rotation_lambda_arn != null
      error_message = "pooler = rds-proxy needs rotation_lambda_arn."
    }
    precondition {
      condition     = local.use_proxy || (var.app_credentials_secret_arn != null && var.pgbouncer_tls_secret_arn != null && var.pgbouncer_image != null && var.db_ca_pem != null)
      error_message = "pooler = pgbouncer needs app_credentials_secret_arn, pgbouncer_tls_secret_arn, pgbouncer_image (pinned by digest) and db_ca_pem (the database's CA bundle)."
    }
  }
}
