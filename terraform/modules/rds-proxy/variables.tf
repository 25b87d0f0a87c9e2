variable "name" {
  description = "Name of the proxy and prefix of everything this module creates (letters, digits, hyphens; starts with a letter)."
  type        = string

  validation {
    condition     = can(regex("^[a-zA-Z](-?[a-zA-Z0-9])*$", var.name)) && length(var.name) <= 48
    error_message = "name must start with a letter, hold only letters, digits and single hyphens, not end with a hyphen, and be at most 48 characters."
  }
}

variable "vpc_id" {
  description = "VPC of the database, the proxy and its clients."
  type        = string

  validation {
    condition     = can(regex("^vpc-[0-9a-f]+$", var.vpc_id))
    error_message = "vpc_id must look like vpc-0123456789abcdef0."
  }
}

variable "subnet_ids" {
  description = "Private subnets for the proxy, in at least two Availability Zones."
  type        = list(string)

  validation {
    condition     = length(var.subnet_ids) >= 2 && alltrue([for s in var.subnet_ids : can(regex("^subnet-[0-9a-f]+$", s))])
    error_message = "subnet_ids needs at least two subnet-... ids (RDS Proxy requires two Availability Zones)."
  }
}

variable "db_instance_identifier" {
  description = "RDS for PostgreSQL instance behind the proxy. Set this or db_cluster_identifier."
  type        = string
  default     = null

  validation {
    condition     = var.db_instance_identifier == null || can(regex("^[a-z][a-z0-9-]{0,62}$", var.db_instance_identifier))
    error_message = "db_instance_identifier must be null or an RDS instance identifier."
  }
}

variable "db_cluster_identifier" {
  description = "Aurora PostgreSQL cluster behind the proxy. Set this or db_instance_identifier."
  type        = string
  default     = null

  validation {
    condition     = var.db_cluster_identifier == null || can(regex("^[a-z][a-z0-9-]{0,62}$", var.db_cluster_identifier))
    error_message = "db_cluster_identifier must be null or an Aurora cluster identifier."
  }
}

variable "db_security_group_id" {
  description = "Security group of the database: the module lets the proxy reach it on db_port."
  type        = string

  validation {
    condition     = can(regex("^sg-[0-9a-f]+$", var.db_security_group_id))
    error_message = "db_security_group_id must look like sg-0123456789abcdef0."
  }
}

variable "db_port" {
  description = "Port PostgreSQL listens on."
  type        = number
  default     = 5432

  validation {
    condition     = var.db_port >= 1 && var.db_port <= 65535 && floor(var.db_port) == var.db_port
    error_message = "db_port must be a whole number between 1 and 65535."
  }
}

variable "db_username" {
  description = "PostgreSQL role the application logs in as (with an IAM token) and the proxy logs in as (with the secret's password). Create it in the database with the password from the secret (see docs/poolers.md)."
  type        = string
  default     = "app"

  validation {
    condition     = can(regex("^[a-z_][a-z0-9_]{0,62}$", var.db_username)) && !contains(["postgres", "rdsadmin", "rds_superuser"], var.db_username)
    error_message = "db_username must be a lower-case PostgreSQL identifier of at most 63 characters and not a superuser role (postgres, rdsadmin)."
  }
}

variable "db_password_version" {
  description = "Bump to write a fresh random password into the secret (the password itself never enters Terraform state). Rotation, if configured, changes it without Terraform."
  type        = number
  default     = 1

  validation {
    condition     = var.db_password_version >= 1 && floor(var.db_password_version) == var.db_password_version
    error_message = "db_password_version must be a whole number >= 1."
  }
}

variable "kms_key_arn" {
  description = "Customer-managed KMS key that encrypts the credentials secret."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/[0-9a-f-]+$", var.kms_key_arn))
    error_message = "kms_key_arn must be a KMS key ARN (arn:aws:kms:<region>:<account>:key/<id>)."
  }
}

variable "rotation_lambda_arn" {
  description = "Secrets Manager rotation function for the credentials secret (for example AWS's SecretsManagerRDSPostgreSQLRotationSingleUser). Clients use IAM tokens, so rotating the password is invisible to them."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:lambda:[a-z0-9-]+:[0-9]{12}:function:[A-Za-z0-9_-]+$", var.rotation_lambda_arn))
    error_message = "rotation_lambda_arn must be a Lambda function ARN."
  }
}

variable "rotation_days" {
  description = "Days between automatic rotations of the proxy's database password."
  type        = number
  default     = 30

  validation {
    condition     = var.rotation_days >= 1 && var.rotation_days <= 365
    error_message = "rotation_days must be between 1 and 365."
  }
}

variable "client_security_group_ids" {
  description = "Security groups of the clients (Lambda functions) allowed to connect to the proxy."
  type        = list(string)

  validation {
    condition     = length(var.client_security_group_ids) >= 1 && alltrue([for s in var.client_security_group_ids : can(regex("^sg-[0-9a-f]+$", s))])
    error_message = "client_security_group_ids needs at least one sg-... id."
  }
}

variable "db_max_connections" {
  description = "The database's max_connections parameter. RDS Proxy sizes its pool as a percentage of it, so the module needs it to hit target_backend_connections."
  type        = number

  validation {
    condition     = var.db_max_connections >= 10 && floor(var.db_max_connections) == var.db_max_connections
    error_message = "db_max_connections must be a whole number >= 10."
  }
}

variable "target_backend_connections" {
  description = "Backend connections the proxy may open to the database. About 50 serve 500+ concurrent Lambda functions in transaction-sized borrows (the same server pool as asyncpool/testing/pgbouncer.ini)."
  type        = number
  default     = 50

  validation {
    condition     = var.target_backend_connections >= 1 && floor(var.target_backend_connections) == var.target_backend_connections
    error_message = "target_backend_connections must be a whole number >= 1."
  }
}

variable "max_idle_connections_share" {
  description = "Share of the proxy's backend connections it may keep open while idle (0 to 1). Half keeps warm connections for bursts without holding the whole pool."
  type        = number
  default     = 0.5

  validation {
    condition     = var.max_idle_connections_share >= 0 && var.max_idle_connections_share <= 1
    error_message = "max_idle_connections_share must be between 0 and 1."
  }
}

variable "connection_borrow_timeout" {
  description = "Seconds a client waits for a free backend connection when the pool is busy before the proxy fails the query. Keep it well below the Lambda timeout (AWS default 120 s is longer than most functions live)."
  type        = number
  default     = 10

  validation {
    condition     = var.connection_borrow_timeout >= 1 && var.connection_borrow_timeout <= 3600
    error_message = "connection_borrow_timeout must be between 1 and 3600 seconds."
  }
}

variable "idle_client_timeout" {
  description = "Seconds a client connection may stay idle before the proxy closes it. A frozen Lambda environment keeps its connection idle; asyncpool validates connections idle longer than validate_after, so a closed one is replaced unseen."
  type        = number
  default     = 1800

  validation {
    condition     = var.idle_client_timeout >= 1 && var.idle_client_timeout <= 28800
    error_message = "idle_client_timeout must be between 1 and 28800 seconds (8 hours)."
  }
}

variable "tags" {
  description = "Tags for every resource the module creates."
  type        = map(string)
  default     = {}
}
