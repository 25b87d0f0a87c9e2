variable "region" {
  description = "AWS region of the database, the pooler and the function."
  type        = string

  validation {
    condition     = can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9]$", var.region))
    error_message = "region must look like eu-west-1."
  }
}

variable "name" {
  description = "Prefix of every resource of the example."
  type        = string
  default     = "asyncpool-example"

  validation {
    condition     = can(regex("^[a-z](-?[a-z0-9])*$", var.name)) && length(var.name) <= 28
    error_message = "name must be lower-case letters, digits and single hyphens, start with a letter and be at most 28 characters."
  }
}

variable "pooler" {
  description = "Which pooler the function goes through: rds-proxy (IAM auth, managed) or pgbouncer (self-hosted on Fargate, named prepared statements). See docs/poolers.md."
  type        = string
  default     = "rds-proxy"

  validation {
    condition     = contains(["rds-proxy", "pgbouncer"], var.pooler)
    error_message = "pooler must be rds-proxy or pgbouncer."
  }
}

variable "vpc_id" {
  description = "VPC of the database."
  type        = string

  validation {
    condition     = can(regex("^vpc-[0-9a-f]+$", var.vpc_id))
    error_message = "vpc_id must look like vpc-0123456789abcdef0."
  }
}

variable "subnet_ids" {
  description = "Private subnets (two or more Availability Zones) for the pooler and the function."
  type        = list(string)

  validation {
    condition     = length(var.subnet_ids) >= 2 && alltrue([for s in var.subnet_ids : can(regex("^subnet-[0-9a-f]+$", s))])
    error_message = "subnet_ids needs at least two subnet-... ids."
  }
}

variable "db_instance_identifier" {
  description = "The existing RDS for PostgreSQL instance."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,62}$", var.db_instance_identifier))
    error_message = "db_instance_identifier must be an RDS instance identifier."
  }
}

variable "db_security_group_id" {
  description = "Security group of the database instance."
  type        = string

  validation {
    condition     = can(regex("^sg-[0-9a-f]+$", var.db_security_group_id))
    error_message = "db_security_group_id must look like sg-0123456789abcdef0."
  }
}

variable "db_max_connections" {
  description = "The instance's max_connections parameter (RDS Proxy sizes its pool as a share of it)."
  type        = number
  default     = 100

  validation {
    condition     = var.db_max_connections >= 60
    error_message = "db_max_connections must leave room for the 50 pooled connections plus administration (>= 60)."
  }
}

variable "db_name" {
  description = "Database the function uses."
  type        = string
  default     = "app"

  validation {
    condition     = can(regex("^[a-z_][a-z0-9_]{0,62}$", var.db_name))
    error_message = "db_name must be a lower-case PostgreSQL identifier."
  }
}

variable "db_username" {
  description = "PostgreSQL role the function logs in as."
  type        = string
  default     = "app"

  validation {
    condition     = can(regex("^[a-z_][a-z0-9_]{0,62}$", var.db_username))
    error_message = "db_username must be a lower-case PostgreSQL identifier."
  }
}

variable "rotation_lambda_arn" {
  description = "rds-proxy: rotation function for the proxy's database password (for example SecretsManagerRDSPostgreSQLRotationSingleUser)."
  type        = string
  default     = null

  validation {
    condition     = var.rotation_lambda_arn == null || can(regex("^arn:aws[a-z-]*:lambda:[a-z0-9-]+:[0-9]{12}:function:[A-Za-z0-9_-]+$", coalesce(var.rotation_lambda_arn, "-")))
    error_message = "rotation_lambda_arn must be null or a Lambda function ARN."
  }
}

variable "app_credentials_secret_arn" {
  description = "pgbouncer: secret with the application's login, JSON {username, password}, shared by PgBouncer and the function."
  type        = string
  default     = null

  validation {
    condition     = var.app_credentials_secret_arn == null || can(regex("^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:.+$", coalesce(var.app_credentials_secret_arn, "-")))
    error_message = "app_credentials_secret_arn must be null or a Secrets Manager secret ARN."
  }
}

variable "pgbouncer_tls_secret_arn" {
  description = "pgbouncer: secret with PgBouncer's TLS certificate and key, JSON {certificate, private_key}."
  type        = string
  default     = null

  validation {
    condition     = var.pgbouncer_tls_secret_arn == null || can(regex("^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:.+$", coalesce(var.pgbouncer_tls_secret_arn, "-")))
    error_message = "pgbouncer_tls_secret_arn must be null or a Secrets Manager secret ARN."
  }
}

variable "pgbouncer_image" {
  description = "pgbouncer: the PgBouncer image pinned by digest (build deploy/pgbouncer/Dockerfile, push it to ECR, pass <repository>@sha256:<digest>)."
  type        = string
  default     = null

  validation {
    condition     = var.pgbouncer_image == null || can(regex("^[a-z0-9][a-z0-9._/:-]*@sha256:[0-9a-f]{64}$", coalesce(var.pgbouncer_image, "-")))
    error_message = "pgbouncer_image must be null or pinned by digest (registry/name@sha256:<64 hex digits>)."
  }
}

variable "db_ca_pem" {
  description = "pgbouncer: the CA bundle (PEM) that signs the database's certificate, so PgBouncer verifies it (verify-full): for RDS the regional bundle, https://truststore.pki.rds.amazonaws.com/<region>/<region>-bundle.pem."
  type        = string
  default     = null

  validation {
    condition     = var.db_ca_pem == null || strcontains(coalesce(var.db_ca_pem, "-"), "-----BEGIN CERTIFICATE-----")
    error_message = "db_ca_pem must be null or PEM certificates."
  }
}

variable "pgbouncer_ca_path" {
  description = "pgbouncer: path, inside the function package, of the CA bundle that signed PgBouncer's certificate."
  type        = string
  default     = "certs/pgbouncer-ca.pem"

  validation {
    condition     = !startswith(var.pgbouncer_ca_path, "/") && !strcontains(var.pgbouncer_ca_path, "..") && endswith(var.pgbouncer_ca_path, ".pem")
    error_message = "pgbouncer_ca_path must be a relative .pem path inside the package."
  }
}

variable "prepared_statements" {
  description = "asyncpool prepared_statements mode; null picks the pooler's: unnamed for rds-proxy, on for pgbouncer."
  type        = string
  default     = null

  validation {
    condition     = var.prepared_statements == null || contains(["off", "on", "unnamed", "describe-cache"], coalesce(var.prepared_statements, "off"))
    error_message = "prepared_statements must be off, on or unnamed (describe-cache: its former name)."
  }
}

variable "lambda_package" {
  description = "Path of the function's deployment package: a zip with the handler, asyncpool and its dependencies built for lambda_architecture (and, for pgbouncer, the CA at pgbouncer_ca_path)."
  type        = string

  validation {
    condition     = endswith(var.lambda_package, ".zip")
    error_message = "lambda_package must be a .zip file."
  }
}

variable "lambda_handler" {
  description = "Handler of the function (module.function)."
  type        = string
  default     = "app.handler"

  validation {
    condition     = can(regex("^[A-Za-z_][A-Za-z0-9_.]*\\.[A-Za-z_][A-Za-z0-9_]*$", var.lambda_handler))
    error_message = "lambda_handler must look like module.function."
  }
}

variable "lambda_architecture" {
  description = "Instruction set of the function: the package must hold wheels for it (asyncpg is a compiled extension)."
  type        = string
  default     = "arm64"

  validation {
    condition     = contains(["arm64", "x86_64"], var.lambda_architecture)
    error_message = "lambda_architecture must be arm64 or x86_64."
  }
}

variable "lambda_runtime" {
  description = "Python runtime of the function."
  type        = string
  default     = "python3.12"

  validation {
    condition     = contains(["python3.11", "python3.12", "python3.13"], var.lambda_runtime)
    error_message = "lambda_runtime must be python3.11, python3.12 or python3.13 (asyncpool needs Python >= 3.11)."
  }
}

variable "lambda_timeout" {
  description = "Function timeout in seconds; keep it above the pooler's borrow timeout (10 s)."
  type        = number
  default     = 30

  validation {
    condition     = var.lambda_timeout > 10 && var.lambda_timeout <= 900
    error_message = "lambda_timeout must be more than 10 and at most 900 seconds."
  }
}

variable "reserved_concurrency" {
  description = "Reserved (and maximum) concurrent executions. Each execution environment holds one pooled connection, so this is the client-connection count the pooler sees."
  type        = number
  default     = 500

  validation {
    condition     = var.reserved_concurrency >= 1 && var.reserved_concurrency <= 1000
    error_message = "reserved_concurrency must be between 1 and 1000 for this example (the pooler is sized for 500+ clients)."
  }
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}
